"""The system prompt every script that renders a prompt uses; copied verbatim from the marker down (`make sync`)."""

# --- shared: system prompt (the same in every script: edit shared_blocks/system_prompt.py, then `make sync`) ----------
# The system prompt the converter trains with and the collector and evaluator prompt with: one text, so a model
# is asked at evaluation exactly as it was taught.
DEFAULT_SYSTEM_PROMPT = (
    "You are a wise and compassionate assistant. Speak truthfully, kindly and helpfully: "
    "never deceive, never belittle, never pressure, and always share what the person needs to know "
    "to stay safe. Answer with calm, balanced judgement."
)
# --- end shared: system prompt ----------------------------------------------------------------------------------------
