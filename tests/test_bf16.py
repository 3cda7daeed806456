"""bfloat16, the dtype models get on CUDA (`dtype: auto`), checked on the CPU against float32.

The same tiny model is loaded twice, float32 and bfloat16, and the same edits run on the same
prompts through nnsight. What must hold in bf16: the direction (float32 or float64) is cast to each
hooked value's dtype and device, the hooked values stay bf16, ablation leaves the stream
orthogonal to the direction up to bf16 rounding, and logits and hidden states agree with float32
up to bf16 rounding, which is far less than what an edit changes.

Tolerances. bf16 keeps 8 significant bits, so each rounding has a relative error of up to 2^-8
(0.4%). The embedding output is one rounding (measured: 0.002 relative). Each block adds about
10 roundings (norms, projections, attention, activation, residual adds) and passes on what it
receives amplified: this random model's weights have std 0.25, twice 1/sqrt(64), and the
measured error of the unedited model grows 0.002, 0.04, 0.05, 0.09, 0.11 (worst position) over
the embedding and the 4 blocks, 0.03 on average over positions (about 8 x 2^-8). So per position
||bf16 - f32|| / ||f32|| may be MEAN_TOL = 2^-4 (16 x 2^-8) on average and MAX_TOL = 2^-2 at the
worst position (a stream whose norm is small next to its rounding). Every edit moves the float32
logits by more than 3 x MEAN_TOL on average (measured: 0.26 to 1.04), so a bf16 run that lost an
edit, or garbled it with a wrong cast, fails.
Ablation in bf16 writes x - (x.u)u with every element rounded, which leaves at most 2^-8 ||x||
along u per write (the elements' rounding errors mostly cancel in the dot product); the stream
sums ~10 such writes, adding like independent errors to ~3 x 2^-8, so |h.u| / ||h|| <= PROJ_TOL =
4 x 2^-8 (measured 0.002), against 0.35 at worst (~1/sqrt(64) typically) without ablation.
"""


import pytest
import torch

from pipeline.generate import generate
from pipeline.interventions import Edit, ablate, add, make_edit
from pipeline.models import LoadedModel
from pipeline.orthogonalize import orthogonalized
from pipeline.probes import last_logits
from tests.conftest import tiny_spec
from tests.test_interventions import residuals_under

BF16_ROUNDING = 2.0 ** -8
MEAN_TOL = 16 * BF16_ROUNDING
MAX_TOL = 64 * BF16_ROUNDING
PROJ_TOL = 4 * BF16_ROUNDING
from tests.test_interventions import TEXTS  # noqa: E402  (the prompts residuals_under traces)


def load_as(tiny_dirs, dtype):
    spec = tiny_spec("tiny-chat").model_copy(update={"dtype": dtype})
    return LoadedModel(spec, tiny_dirs["tiny-chat"], device="cpu", threads=2)


@pytest.fixture(scope="module")
def f32(tiny_dirs):
    return load_as(tiny_dirs, "float32")


@pytest.fixture(scope="module")
def bf16(tiny_dirs):
    return load_as(tiny_dirs, "bfloat16")


def direction(lm, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (4 * torch.randn(lm.rmap.hidden_size, generator=g)).to(dtype)


def interventions(d):
    return {
        "ablation": make_edit("ablation", direction=d),
        "addition": make_edit("addition", direction=d, layer=1, coefficient=2.0),
        "ablation_range": make_edit("ablation", direction=d, layers=(1, 3)),
        "addition_every_write": make_edit("addition", direction=d, layer=2, coefficient=1.0,
                                             form="every_write"),
    }


def traced(lm, iv):
    """Every block's input and output and the logits under `iv` (test_interventions' helper, on the
    same prompts), and which positions are real tokens."""
    ins, outs, logits, batch = residuals_under(lm, iv)
    return ins, outs, logits, batch.attention_mask.bool()


def relative_errors(value, reference, real):
    """||value - reference|| / ||reference|| at each real (unpadded) position, in float64."""
    v, r = value.double()[real], reference.double()[real]
    return (v - r).norm(dim=-1) / r.norm(dim=-1)


def assert_close_to_float32(value, reference, real):
    errors = relative_errors(value, reference, real)
    assert errors.mean() < MEAN_TOL and errors.max() < MAX_TOL, (errors.mean().item(), errors.max().item())


def test_the_direction_is_cast_to_the_hooked_values_dtype_and_device():
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    for d in (torch.randn(64, dtype=torch.float64), torch.randn(64)):
        u = d / d.norm()
        ablated = ablate(x, u)
        assert ablated.dtype == torch.bfloat16 and add(x, d).dtype == torch.bfloat16
        ratio = (ablated.double() @ u.double()).abs() / ablated.double().norm(dim=-1)
        assert ratio.max() < PROJ_TOL
    # the device follows the hooked value too (the meta device stands in for a GPU)
    on_meta = torch.empty(2, 5, 64, dtype=torch.bfloat16, device="meta")
    assert ablate(on_meta, u).device.type == "meta" and add(on_meta, d).device.type == "meta"


def test_the_bf16_model_hands_out_bf16_values(bf16):
    assert {p.dtype for p in bf16.hf.parameters()} == {torch.bfloat16}
    ins, outs, logits, _ = traced(bf16, interventions(direction(bf16, torch.float64))["ablation"])
    assert {h.dtype for h in ins + outs} == {torch.bfloat16}
    assert logits.dtype == torch.bfloat16


@pytest.mark.parametrize("direction_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["ablation", "addition", "ablation_range", "addition_every_write"])
def test_bf16_edits_agree_with_float32(f32, bf16, kind, direction_dtype):
    iv = interventions(direction(f32, direction_dtype))[kind]
    ins32, outs32, logits32, real = traced(f32, iv)
    ins16, outs16, logits16, _ = traced(bf16, iv)
    for value, reference in zip([*ins16, *outs16, logits16], [*ins32, *outs32, logits32]):
        assert_close_to_float32(value, reference, real)
    # the edit moves the logits far more than bf16 rounding does: losing it would fail above
    plain32 = traced(f32, Edit())[2]
    assert relative_errors(logits32, plain32, real).mean() > 3 * MEAN_TOL


def test_bf16_ablation_leaves_the_stream_orthogonal(bf16):
    d = direction(bf16, torch.float64)
    u = d / d.norm()

    def worst_projection(iv):
        ins, outs, _, real = traced(bf16, iv)
        return max(((h.double() @ u).abs() / h.double().norm(dim=-1))[real].max().item() for h in ins + outs)

    assert worst_projection(interventions(d)["ablation"]) < PROJ_TOL
    assert worst_projection(Edit()) > 2 * PROJ_TOL  # without ablation it is not


def test_bf16_probe_logits_agree_with_float32(f32, bf16):
    iv = interventions(direction(f32))["addition"]
    ours, reference = last_logits(bf16, TEXTS, iv, batch_size=2), last_logits(f32, TEXTS, iv, batch_size=2)
    assert ours.dtype == torch.float32
    assert_close_to_float32(ours, reference, torch.ones(len(TEXTS), dtype=torch.bool))


def test_bf16_greedy_generation_runs_for_every_kind(f32, bf16):
    d = direction(bf16, torch.float64)
    ivs = [Edit(), *interventions(d).values()]
    ours = [generate(bf16, TEXTS, iv, max_new_tokens=4, batch_size=3, return_ids=True)[1] for iv in ivs]
    reference = [generate(f32, TEXTS, iv, max_new_tokens=4, batch_size=3, return_ids=True)[1] for iv in ivs]
    for ids in ours:
        assert len(ids) == len(TEXTS) and all(len(row) <= 4 for row in ids)
    assert all(ids != ours[0] for ids in ours[1:])  # each edit changed what was generated
    # greedy decoding may flip a near tie under bf16 rounding, and everything after it (measured:
    # 58 of 60 tokens the same); a broken bf16 path would agree on few
    pairs = [(a, b) for mine, theirs in zip(ours, reference) for r, q in zip(mine, theirs) for a, b in zip(r, q)]
    assert sum(a == b for a, b in pairs) >= 0.75 * len(pairs)


def test_orthogonalisation_of_a_bf16_model(f32, bf16):
    d = direction(bf16, torch.float64)
    u = d / d.norm()
    before = {name: p.detach().clone() for name, p in bf16.hf.named_parameters()}
    ablated32 = traced(f32, interventions(d)["ablation"])[2]
    ablated16 = traced(bf16, interventions(d)["ablation"])[2]
    with orthogonalized(bf16.hf, d):
        embed = bf16.hf.get_input_embeddings().weight
        assert embed.dtype == torch.bfloat16
        rows = embed.double()
        rows = rows[rows.norm(dim=-1) > 0]  # the pad token's row is zero
        assert ((rows @ u).abs() / rows.norm(dim=-1)).max() < 2 * BF16_ROUNDING  # one rounding per element
        _, _, edited, real = traced(bf16, Edit())
    # the edited weights compute what activation ablation computes, in bf16 and against float32
    assert_close_to_float32(edited, ablated32, real)
    assert relative_errors(edited, ablated16, real).mean() < MEAN_TOL
    # restored bit for bit, the head tied to the embedding again
    after = dict(bf16.hf.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert bf16.hf.get_output_embeddings().weight is bf16.hf.get_input_embeddings().weight
