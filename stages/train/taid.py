"""TAID: Temporally Adaptive Interpolated Distillation (Shing, Misaki, Bao, Yokoi & Akiba
2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer
in Language Models", ICLR 2025, arXiv 2501.16937). Equations are cited by section of the
paper (its equation numbers were not checked against the text here).

Interpolated target (Sec. 3.1): the student learns from an intermediate distribution that
moves from its own (detached) prediction towards the teacher's as t goes from 0 to 1,

    p_t = softmax( (1 - t) * stopgrad(z_s) + t * z_t )
    J_TAID(t) = KL( p_t || q_theta ),   q_theta = softmax(z_s)

Adaptive schedule for t (Sec. 3.2, Algorithm 1), one update per optimisation step n out of
N, from the step's loss J_n:

    delta_n = (J_{n-1} - J_n) / J_{n-1}                  relative loss improvement
    m_n     = beta * m_{n-1} + (1 - beta) * delta_n      momentum
    t_n     = min( t_end, max( t_start + (t_end - t_start) * n / N,
                               t_{n-1} + alpha * sigmoid(m_n) * (1 - t_{n-1}) ) )

so t is never behind the linear schedule, and runs ahead of it while the loss keeps
improving (sigmoid(m) > 1/2); t_start = 0.4, alpha = 5e-4, beta = 0.99 follow the paper's
released code. With a stagnant loss, m -> 0 and the adaptive step is alpha / 2 * (1 - t),
which for the paper's alpha is below the linear slope unless N is in the thousands.
"""

from __future__ import annotations

import math
from stages.lazy import lazy

torch = lazy("torch")
F = lazy("torch.nn.functional")



def taid_loss(z_s, z_t, y, t: float, temperature: float, alpha: float):
    """alpha * T^2 * KL(p_t || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s), batch mean, with
    p_t = softmax(((1 - t) * stopgrad(z_s) + t * z_t) / T).

    The paper's objective (Sec. 3.1) is the case T = 1, alpha = 1. The temperature and the
    hard-label term are applied exactly as in this stage's Hinton loss (both logits divided
    by T, the KL term scaled by T^2), so that ``loss: taid`` at t = 1 is ``loss: hinton``
    and the two share the ``temperature``/``alpha`` settings; set ``temperature: 1`` and
    ``alpha: 1`` for the paper's loss. At t = 0 the KL term and its gradient are zero."""
    hard = F.cross_entropy(z_s, y)
    if alpha == 0:
        return hard
    target = ((1 - t) * z_s.detach() + t * z_t) / temperature
    kl = F.kl_div(F.log_softmax(z_s / temperature, dim=1), F.log_softmax(target, dim=1),
                  log_target=True, reduction="batchmean")
    return alpha * temperature * temperature * kl + (1 - alpha) * hard


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # no overflow for very negative momentum
    return e / (1.0 + e)


class TAIDSchedule:
    """The interpolation parameter t of TAID (Sec. 3.2): plain floats, picklable, with
    ``state_dict``/``load_state_dict`` for checkpoints. ``update(loss, step, total_steps)``
    is called after each optimisation step with that step's loss and the number of steps
    done so far (1 after the first) and returns the t for the next step. On the first call
    there is no previous loss to compare with, so m stays 0 and only t moves."""

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99):
        if not 0 <= t_start <= t_end <= 1:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got t_start={t_start}, "
                             f"t_end={t_end}")
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t, self.m, self.prev_loss, self.step = t_start, 0.0, None, 0

    def linear(self, step: int, total_steps: int) -> float:
        """The linear schedule's t after ``step`` of ``total_steps`` (clamped to t_end)."""
        frac = min(1.0, step / total_steps) if total_steps > 0 else 1.0
        return self.t_start + (self.t_end - self.t_start) * frac

    def update(self, loss: float, step: int, total_steps: int) -> float:
        loss = float(loss.item() if torch.is_tensor(loss) else loss)
        if self.prev_loss is not None:
            r = (self.prev_loss - loss) / max(abs(self.prev_loss), 1e-12)
            self.m = self.beta * self.m + (1 - self.beta) * r
        self.prev_loss, self.step = loss, step
        adaptive = self.t + self.alpha * _sigmoid(self.m) * (1 - self.t)
        self.t = min(self.t_end, max(self.linear(step, total_steps), adaptive))
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "m": self.m, "prev_loss": self.prev_loss, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.m = float(state["t"]), float(state["m"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.step = int(state["step"])
