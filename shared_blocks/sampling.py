"""Temperature and nucleus (top-p) sampling for generate(), the same in the collector and the evaluator; copied
verbatim from the marker down (`make sync`)."""

from __future__ import annotations


# --- shared: sampling (the same in every script: edit shared_blocks/sampling.py, then `make sync`) -------------------
def sampling_options(temperature: float, top_p: float) -> dict:
    """generate()'s options: greedy at temperature 0; otherwise the token is drawn by NucleusSampler and generate()
    picks it greedily. The distribution is transformers' own (temperature, then top-p, then a draw from what is
    left), without its cost on a CPU: torch.multinomial and the top-p sort of the whole vocabulary take 40 and 75 ms a
    step at batch 32 on 2 cores, as long as SmolLM2-135M's forward pass (bench/bench_collector.py)."""
    if not temperature:
        return {"do_sample": False}
    return {"do_sample": False, "logits_processor": [NucleusSampler(temperature, top_p)]}


class NucleusSampler:
    """A logits processor that samples: every score but the drawn token's becomes -inf. The nucleus is found among
    the most probable 256 (then 4096) tokens, and in the whole vocabulary only when they hold less than top_p; the
    draw is one uniform number a row against the nucleus's cumulative sum, from torch's global generator (--seed)."""

    TIERS = (256, 4096)

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            probs, index = self.nucleus(probs)
        else:
            index = None
        total = probs.cumsum(dim=-1)
        draw = torch.rand(total.shape[0], 1, device=total.device) * total[:, -1:]
        token = torch.searchsorted(total, draw, right=True).clamp_(max=total.shape[-1] - 1)
        if index is not None:
            token = index.gather(-1, token)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)

    def nucleus(self, probs):
        """(probabilities, their token ids) in descending order, zero outside the nucleus: a token stays when the
        tokens more probable than it hold less than top_p (transformers' TopPLogitsWarper)."""
        for k in (*self.TIERS, probs.shape[-1]):
            top, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
            if k >= probs.shape[-1] or bool((top.sum(dim=-1) >= self.top_p).all()):
                break
        return top.masked_fill(top.cumsum(dim=-1) - top >= self.top_p, 0.0), index


# --- end shared: sampling --------------------------------------------------------------------------------------------
