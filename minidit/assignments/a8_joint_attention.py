"""A8 — joint attention for MMDiT: concatenate [text; image], ONE attention with a text padding mask, split back.

References: `minidit.mmdit.joint_attention` and `minidit.mmdit.JointAttention` (SD3 §4; Stability-AI/sd3-ref).
The notebook fixes the package's attribute names (qkv_img, qkv_txt, proj_img, proj_txt; q_norm, k_norm for the image
stream as in every minidit attention layer, q_norm_txt, k_norm_txt for the text) so the package module's weights
load into the student's module and the outputs can be compared.
"""

from __future__ import annotations

import torch

from minidit import mmdit
from minidit.grading.checks import Answer, Check, randn, randomize_

NAME = "A8_joint_attention"
TITLE = "Joint attention for MMDiT"
DISABLED = ["minidit.mmdit:joint_attention", "minidit.mmdit:concat_text_image", "minidit.mmdit:JointAttention.heads",
            "minidit.mmdit:JointAttention.forward"]

B, H, L, T, HD = 2, 3, 5, 7, 8
D = 24


def _qkv(seed: int) -> list[torch.Tensor]:
    return [randn(seed + i, B, H, n, HD) for i, n in enumerate((L, L, L, T, T, T))]


def _txt_mask() -> torch.Tensor:
    m = torch.ones(B, L, dtype=torch.bool)
    m[0, -2:] = False  # sample 0: the last 2 text tokens are padding; sample 1: none
    return m


def _fn_probe(joint_attention) -> list:
    return list(joint_attention(*_qkv(0)))


def _fn_answer() -> Answer:
    qkv = _qkv(0)

    def explicit(scale: float, per_modality: bool = False, split: int = L) -> list:
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(qkv[:3], qkv[3:]))
        scores = q @ k.transpose(-2, -1) * scale
        w = (torch.cat([scores[..., :L].softmax(-1), scores[..., L:].softmax(-1)], -1) / 2 if per_modality
             else scores.softmax(-1))
        out = w @ v
        return [out[:, :, :split], out[:, :, split:]]

    return Answer(list(mmdit.joint_attention(*qkv)), {
        "the scores are not scaled: divide q·kᵀ by √d": lambda: explicit(1.0),
        "each modality gets its own softmax: one softmax over all L + T keys": lambda: explicit(HD**-0.5, True),
        "the output is split at T instead of L: the first L rows are the text's": lambda: explicit(HD**-0.5, split=T)})


def _fn_mask_probe(joint_attention) -> dict:
    qkv, mask = _qkv(10), _txt_mask()
    out_t, out_i = joint_attention(*qkv, txt_mask=mask)
    k_t, v_t = qkv[1].clone(), qkv[2].clone()
    k_t[0, :, -2:] = 100 * randn(16, H, 2, HD)  # change only the padded text keys/values
    v_t[0, :, -2:] = 100 * randn(17, H, 2, HD)
    _, out_i2 = joint_attention(qkv[0], k_t, v_t, *qkv[3:], txt_mask=mask)
    return {"text": out_t, "image": out_i, "image_after_changing_padding": out_i2}


def _fn_mask_expect() -> dict:
    out_t, out_i = mmdit.joint_attention(*_qkv(10), txt_mask=_txt_mask())
    return {"text": out_t, "image": out_i, "image_after_changing_padding": out_i}


def _both_ways_probe(joint_attention) -> dict:
    """Text outputs must depend on the image keys, and image outputs on the text keys (one shared softmax)."""
    qkv = _qkv(20)
    out_t, out_i = joint_attention(*qkv)
    k_i = qkv[4] + 1.0
    k_t = qkv[1] + 1.0
    out_t2, _ = joint_attention(qkv[0], qkv[1], qkv[2], qkv[3], k_i, qkv[5])
    _, out_i2 = joint_attention(qkv[0], k_t, qkv[2], *qkv[3:])
    return {"text_reads_image": bool((out_t2 - out_t).abs().max() > 1e-3),
            "image_reads_text": bool((out_i2 - out_i).abs().max() > 1e-3)}


def _judge_both_ways(got, _) -> str | None:
    if not isinstance(got, dict):
        return f"expected two answers, got {type(got).__name__}"
    if got.get("text_reads_image") is not True:
        return "changing the image keys did not change the text outputs: text queries must attend to image keys too"
    if got.get("image_reads_text") is not True:
        return "changing the text keys did not change the image outputs: image queries must attend to text keys too"
    return None


def _reference(qk_norm: bool = False, pre_only: bool = False) -> mmdit.JointAttention:
    return randomize_(mmdit.JointAttention(D, H, qk_norm=qk_norm, pre_only=pre_only), seed=30 + 2 * qk_norm + pre_only)


def _run_module(JointAttention, qk_norm: bool) -> list:
    m = JointAttention(D, H, qk_norm=True) if qk_norm else JointAttention(D, H)
    m.load_state_dict(_reference(qk_norm).state_dict())
    img, txt = randn(40, B, T, D), randn(41, B, L, D)
    return list(m(img, txt, _txt_mask())) + list(m(randn(42, 1, 1, D), randn(43, 1, 1, D)))


def _module_probe(JointAttention) -> list:  # a probe's parameters are the notebook names it needs
    return _run_module(JointAttention, qk_norm=False)


def _module_qk_probe(JointAttention) -> list:
    return _run_module(JointAttention, qk_norm=True)


def _module_expect(qk_norm: bool = False) -> list:
    ref = _reference(qk_norm)
    img, txt = randn(40, B, T, D), randn(41, B, L, D)
    return list(ref(img, txt, _txt_mask())) + list(ref(randn(42, 1, 1, D), randn(43, 1, 1, D)))


def _pre_only_probe(JointAttention) -> dict:
    m = JointAttention(D, H, pre_only=True)
    m.load_state_dict(_reference(pre_only=True).state_dict())
    out_img, out_txt = m(randn(44, B, T, D), randn(45, B, L, D), _txt_mask())
    return {"image": out_img, "text_is_none": out_txt is None, "has_proj_txt": getattr(m, "proj_txt", None) is not None}


def _pre_only_expect() -> dict:
    reference = _reference(pre_only=True)
    return {"image": reference(randn(44, B, T, D), randn(45, B, L, D), _txt_mask())[0], "text_is_none": True,
            "has_proj_txt": False}


CHECKS = [
    Check("joint_attention: concatenate, one softmax, split back (= minidit.mmdit.joint_attention)", points=2,
          probe=_fn_probe, expect=_fn_answer, atol=1e-5, rtol=1e-4),
    Check("joint_attention: the text padding mask (padded text keys ignored by text AND image queries)", points=2,
          probe=_fn_mask_probe, expect=_fn_mask_expect),
    Check("joint_attention: information flows both ways (text reads the image, the image reads the text)", points=1,
          probe=_both_ways_probe, judge=_judge_both_ways),
    Check("JointAttention: the package module's weights give the same outputs (with a mask)", points=2,
          probe=_module_probe, expect=_module_expect),
    Check("JointAttention(qk_norm=True): RMSNorm of q and k per head and per modality", points=1,
          probe=_module_qk_probe,
          expect=lambda: _module_expect(qk_norm=True)),
    Check("JointAttention(pre_only=True): text only contributes keys/values (no text output, no proj_txt)", points=1,
          probe=_pre_only_probe, expect=_pre_only_expect),
]
