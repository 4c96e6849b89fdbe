"""`--quant auto`: int8 where it computes what fp32 computes, on this model, here.

At load the engine runs a short built-in text through the fp32 model, swaps in the
int8 layers, runs it again, and keeps int8 only if the two agree: top-1 agreement at
least MIN_TOP1 and mean KL(fp32 || int8) at most MAX_KL over the text's positions.
Otherwise it puts the fp32 layers back. The text is neither the w8a8 calibration
text nor the held-out text the tests and bench/quant_accuracy.py measure on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_TOP1 = 0.97
MAX_KL = 0.01
CHECK_TOKENS = 256  # the check's cost at load: two prefills of this many tokens

# prose, a chat turn, code and figures, in ~300 tokens
CHECK_TEXT = """<|im_start|>user
Which birds migrate the farthest, and how do they find their way?<|im_end|>
<|im_start|>assistant
The Arctic tern makes the longest known migration, about 70,000 km a year between the
Arctic and the Antarctic. Birds steer by the sun and the stars, by the Earth's magnetic
field, and by landmarks such as coastlines and mountain ranges they learn when young.<|im_end|>
Orchards on the southern slope ripen a week earlier than those in the valley, because the
soil warms sooner in spring. The cooperative weighs each crate at the gate: 18.4 kg, 17.9 kg,
19.2 kg, and pays 0.62 euros a kilogram, so a crate of 18.4 kg earns 11.41 euros.

fn mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    Some(values.iter().sum::<f64>() / values.len() as f64)
}

SELECT name, MAX(score) FROM results GROUP BY name ORDER BY 2 DESC;
"""


@dataclass(frozen=True)
class QuantCheck:
    """How the quantized model's next-token distributions compare with fp32's."""

    top1: float  # fraction of positions where both pick the same most likely token
    kl: float  # mean KL(fp32 || quantized), nats
    tokens: int

    @property
    def passed(self) -> bool:
        return self.top1 >= MIN_TOP1 and self.kl <= MAX_KL

    def describe(self) -> str:
        return f"top-1 {self.top1:.3f}, KL {self.kl:.4f} against fp32 on {self.tokens} tokens"


def compare_logits(reference: torch.Tensor, got: torch.Tensor) -> QuantCheck:
    """QuantCheck of logits `got` against `reference`, both [positions, vocab]."""
    ref_logp = torch.log_softmax(reference.float(), -1)
    got_logp = torch.log_softmax(got.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - got_logp)).sum(-1)
    top1 = (reference.argmax(-1) == got.argmax(-1)).float().mean()
    kl_mean = max(kl.mean().item(), 0.0)  # rounding can make it a hair below zero
    return QuantCheck(top1=top1.item(), kl=kl_mean, tokens=reference.shape[0])
