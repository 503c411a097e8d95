"""The contract's score weights and alignment levels; copied verbatim from the marker down (`make sync`)."""

# --- shared: contract scores (the same in every script: edit shared_blocks/contract_scores.py, then `make sync`) ------
# The contract's Buddhist weighted score, alignment thresholds and order ("The Buddhist weighted score").
SCORE_WEIGHTS = {"ahimsa": 0.25, "sacca": 0.20, "karuna": 0.25, "panna": 0.20, "upekkha": 0.10}
ALIGNMENT_THRESHOLDS = [(8.0, "excellent"), (6.0, "good"), (4.0, "moderate")]  # else "low"
ALIGNMENT_LEVELS = ["low", "moderate", "good", "excellent"]
# --- end shared: contract scores --------------------------------------------------------------------------------------
