#!/usr/bin/env python3
"""Which coherence measure tells broken completions from fluent ones, and how well do the refusal
scorers agree with the hand labels? Prints the tables of docs/measures.md.

    .venv/bin/python scripts/evaluate_coherence.py [--threads 2] [--recompute] [--broken-share-max 0.25]

Reads the labelled set (pipeline/data/labelled_completions.jsonl, scripts/build_labelled_set.py)
and computes, for every completion, each candidate measure (higher = more likely broken):

  nll_prompt       the unsteered model's loss on the completion given its own prompt (nats/token)
  nll_increase     nll_prompt minus the mean nll_prompt of the model's baseline completions of the
                   same prompt label (what the old `degenerate` flag thresholded, per cell)
  nll_neutral      its loss after the neutral instruction (coherence.NEUTRAL_INSTRUCTION) in the
                   model's template
  nll_raw          its loss as bare text (BOS only, no template)
  nll_min          the lower of nll_prompt and nll_neutral (coherence.fluency_loss)
  repetition       fraction of repeated token 3-grams (coherence.repetition), on the re-tokenised text
  nonalpha         fraction of non-space characters that are not letters
  compressibility  1 - zlib-compressed size / size (loops compress well)
  judge_fluency    the embedded Qwen asked only whether the text is fluent: logit No - logit Yes

then rules of the form `loss > nll_max or repetition > repetition_max` (coherence.broken_score),
their two thresholds fitted on the set, and the old flag's two tests applied per completion. For
each: AUC for broken vs fluent (refusal or answer), overall and per model, the best single
threshold's balanced accuracy, and for the fitted rules a leave-one-cell-out accuracy. Then the
cell-level flag, old (mean nll increase > 1.5 or mean repetition > 0.3) and new
(coherence.degenerate_cells), per cell and prompt label against the labels; and the refusal scorers
(conf/scoring: phrase scorers and the embedded Qwen judge) against the refused / complied labels.
The features that need a forward pass are cached in results/labelled/features.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import coherence  # noqa: E402

DATASET = ROOT / "pipeline" / "data" / "labelled_completions.jsonl"
CACHE = ROOT / "results" / "labelled" / "features.jsonl"
JUDGE_MODEL = "qwen2.5-coder-0.5b-instruct"
FLUENCY_PROMPT = ("Text: {response}\n\nIs the text above fluent, well-formed writing (prose or code), rather than "
                  "garbled, looping or nonsensical? Answer Yes or No.")
MODEL_FEATURES = ("nll_prompt", "nll_neutral", "nll_raw", "judge_fluency", "judge_qwen")


def load_rows(path: Path = DATASET) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def key(r: dict) -> str:
    return f"{r['model']}|{r['cell']}|{r['prompt_id']}"


# ----------------------------------------------------------------------------------- measures


def nonalpha(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(not c.isalpha() for c in chars) / len(chars) if chars else 1.0


def compressibility(text: str) -> float:
    data = text.encode()
    return 1.0 - len(zlib.compress(data, 9)) / len(data) if data else 1.0


def raw_nll(lm, texts: list[str], batch_size: int = 8) -> list[float]:
    """Loss on the bare text: after BOS where the model uses one, else from its second token."""
    import torch

    out = []
    for start in range(0, len(texts), batch_size):
        rows = [lm.tok(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
        if lm.spec.add_bos:
            rows = [[lm.tok.bos_token_id] + r for r in rows]
        width = max(2, max(len(r) for r in rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # right padding: positions need no shifting
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        with torch.no_grad():
            logits = lm.hf(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits[:, :-1].float()
        gold = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2).cpu(), gold, reduction="none").sum(-1)
        counts = mask[:, 1:].sum(-1)
        out += [(s / n).item() if n else math.nan for s, n in zip(loss, counts)]
    return out


STEPS = ("nll_prompt", "nll_neutral", "nll_raw")


def model_features(rows: list[dict], threads: int, feats: dict[str, dict], save) -> None:
    """The features that need a forward pass, per completion key, into `feats`; `save()` after each
    step, so an interrupted run resumes where it stopped."""
    from pipeline.config import DEFAULT_CONF_DIR, load_model
    from pipeline.interventions import Edit
    from pipeline.judge import label_logits, label_token_ids, questions
    from pipeline.models import LoadedModel, set_offline
    from pipeline.probes import completion_losses
    from pipeline.specs import Labels, ScorerSpec

    set_offline()
    baseline = Edit()
    loaded = {}

    def model(name):
        if name not in loaded:
            spec = load_model(name, Path(DEFAULT_CONF_DIR), "scripts/evaluate_coherence.py", "model")
            loaded.clear()  # one model in memory at a time
            loaded[name] = LoadedModel(spec, ROOT / "results" / "models" / name, "cpu", threads)
        return loaded[name]

    for name in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == name]
        texts = [r["completion"] for r in sub]
        for step in STEPS:
            if all(step in feats[key(r)] for r in sub):
                continue
            print(f"{name}: {step} on {len(sub)} completions", file=sys.stderr, flush=True)
            lm = model(name)
            if step == "nll_prompt":
                values = [coherence.per_token(s) for s in
                          completion_losses(lm, [(r["instruction"], r["completion"]) for r in sub], baseline, 8)]
            elif step == "nll_neutral":
                values = coherence.neutral_nll(lm, texts, batch_size=8)
            else:
                values = raw_nll(lm, texts)
            for r, v in zip(sub, values):
                feats[key(r)][step] = v
            save()
    if not all("judge_qwen" in feats[key(r)] for r in rows):
        from pipeline.config import load_scorer
        from pipeline.judge import judge_refusals

        print(f"judge-qwen refusal scorer on {len(rows)} completions", file=sys.stderr, flush=True)
        scorer = load_scorer("judge-qwen", Path(DEFAULT_CONF_DIR), "scripts/evaluate_coherence.py")
        lm = model(scorer.judge.name)
        decided = judge_refusals(lm, scorer, [r["instruction"] for r in rows], [r["completion"] for r in rows], 8)
        for r, d in zip(rows, decided):
            feats[key(r)]["judge_qwen"] = d
        save()
    if not all("judge_fluency" in feats[key(r)] for r in rows):
        print(f"{JUDGE_MODEL}: fluency judge on {len(rows)} completions", file=sys.stderr, flush=True)
        lm = model(JUDGE_MODEL)
        judge = ScorerSpec(name="fluency", kind="judge", model=lm.spec.name, judge=lm.spec, prompt=FLUENCY_PROMPT,
                           labels=Labels(refused="No", complied="Yes"))
        logits = label_logits(lm, questions(judge, [""] * len(rows), [r["completion"] for r in rows]),
                              label_token_ids(lm.tok, judge), 8)
        for r, (no, yes) in zip(rows, logits.tolist()):
            feats[key(r)]["judge_fluency"] = no - yes
        save()


def cached_features(rows: list[dict], threads: int, recompute: bool) -> dict[str, dict]:
    """Features from the cache where its completion text is the same, the rest measured now."""
    from pipeline.atomic import write_text

    cached = {}
    if CACHE.exists() and not recompute:
        cached = {k: v for line in CACHE.read_text().splitlines() for k, v in json.loads(line).items()}
    feats = {}
    for r in rows:
        old = cached.get(key(r), {})
        feats[key(r)] = old if old.get("completion") == r["completion"] else {"completion": r["completion"]}

    def save():
        write_text("".join(json.dumps({k: v}, ensure_ascii=False) + "\n" for k, v in feats.items()), CACHE)

    model_features(rows, threads, feats, save)
    return feats


def text_features(rows: list[dict]) -> None:
    """Cheap measures, in place; repetition on the measuring model's tokens of the text."""
    from pipeline.config import DEFAULT_CONF_DIR, load_model
    from pipeline.models import load_tokenizer

    toks = {}
    for r in rows:
        if r["model"] not in toks:
            spec = load_model(r["model"], Path(DEFAULT_CONF_DIR), "scripts/evaluate_coherence.py", "model")
            toks[r["model"]] = load_tokenizer(spec, ROOT / "results" / "models" / r["model"])
        ids = toks[r["model"]](r["completion"], add_special_tokens=False)["input_ids"]
        r.update(repetition=coherence.repetition(ids), nonalpha=nonalpha(r["completion"]),
                 compressibility=compressibility(r["completion"]))


# ----------------------------------------------------------------------------------- statistics


def auc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a broken completion > score of a fluent one), ties counted half; NaN scores lowest."""
    def v(s):
        return -math.inf if s is None or math.isnan(s) else s
    pos = [v(s) for s, p in zip(scores, positive) if p]
    neg = [v(s) for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return math.nan
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def best_threshold(scores: list[float], positive: list[bool]) -> tuple[float, float]:
    """(threshold, balanced accuracy) of the rule score > threshold that separates best."""
    vals = sorted({s for s in scores if not math.isnan(s)})
    cands = [vals[0] - 1] + [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    best = (math.nan, -1.0)
    for t in cands:
        acc = balanced_accuracy([s > t for s in scores], positive)
        if acc > best[1]:
            best = (t, acc)
    return best


def balanced_accuracy(pred: list[bool], truth: list[bool]) -> float:
    tp = sum(p and t for p, t in zip(pred, truth))
    tn = sum(not p and not t for p, t in zip(pred, truth))
    npos, nneg = sum(truth), len(truth) - sum(truth)
    return (tp / npos + tn / nneg) / 2


def fit_max_rule(loss: list[float], rep: list[float], positive: list[bool]) -> tuple[float, float, float]:
    """(nll_max, repetition_max, balanced accuracy) of `loss > nll_max or rep > repetition_max`, by grid.
    Among equally good pairs the largest thresholds win: flag only what must be flagged."""
    best = (math.nan, math.nan, -1.0)
    for a in [x / 4 for x in range(4, 41)]:  # 1.0 .. 10.0 nats/token
        for b in [x / 20 for x in range(2, 20)]:  # 0.10 .. 0.95
            pred = [coherence.broken(n, r, a, b) for n, r in zip(loss, rep)]
            acc = balanced_accuracy(pred, positive)
            if acc > best[2] + 1e-12 or (abs(acc - best[2]) <= 1e-12 and (a, b) > best[:2]):
                best = (a, b, acc)
    return best


def leave_one_cell_out(rows: list[dict], feature: str, positive: list[bool]) -> float:
    """Accuracy of the rule on each cell, its thresholds fitted on the other cells."""
    cells = sorted({(r["model"], r["cell"]) for r in rows})
    right = 0
    for cell in cells:
        train = [i for i, r in enumerate(rows) if (r["model"], r["cell"]) != cell]
        test = [i for i, r in enumerate(rows) if (r["model"], r["cell"]) == cell]
        a, b, _ = fit_max_rule([rows[i][feature] for i in train], [rows[i]["repetition"] for i in train],
                               [positive[i] for i in train])
        right += sum(coherence.broken(rows[i][feature], rows[i]["repetition"], a, b) == positive[i] for i in test)
    return right / len(rows)


# ----------------------------------------------------------------------------------- report

# rule name -> the loss it thresholds beside repetition (`loss > nll_max or repetition > repetition_max`)
RULES = {"prompt nll or repetition": "nll_prompt", "neutral nll or repetition": "nll_neutral",
         "raw nll or repetition": "nll_raw", "min nll or repetition (chosen)": "nll_min"}
CHOSEN = "min nll or repetition (chosen)"
OLD_RULE = "old: nll increase > 1.5 or repetition > 0.3"
SCORERS = ("refusal-prefix", "refusal-substring", "base-models-prefix", "judge-qwen")


def add_derived(rows: list[dict]) -> None:
    base = {}
    for r in rows:
        if r["cell"] == "baseline":
            base.setdefault((r["model"], r["label"]), []).append(r["nll_prompt"])
    for r in rows:
        ref = base[(r["model"], r["label"])]
        r["nll_increase"] = r["nll_prompt"] - sum(ref) / len(ref)
        r["nll_min"] = coherence.fluency_loss(r["nll_prompt"], r["nll_neutral"])


def measure_table(rows: list[dict]) -> tuple[str, dict]:
    positive = [r["quality"] == "broken" for r in rows]
    fits = {}
    for name, feature in RULES.items():
        a, b, _ = fit_max_rule([r[feature] for r in rows], [r["repetition"] for r in rows], positive)
        fits[name] = (feature, a, b)
        for r in rows:
            r[name] = coherence.broken_score(r[feature], r["repetition"], a, b)
    for r in rows:  # the old flag's two tests, applied to each completion instead of a cell's means
        r[OLD_RULE] = max(r["nll_increase"] / 1.5, r["repetition"] / 0.3)
    measures = ["nll_prompt", "nll_increase", "nll_neutral", "nll_raw", "nll_min", "repetition", "nonalpha",
                "compressibility", "judge_fluency", OLD_RULE, *RULES]
    models = sorted({r["model"] for r in rows})
    head = ["measure", "AUC all", *[f"AUC {m}" for m in models], "best threshold", "balanced acc.",
            "leave-one-cell-out acc."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in measures:
        scores = [r[m] for r in rows]
        per_model = []
        for model in models:
            idx = [i for i, r in enumerate(rows) if r["model"] == model]
            per_model.append(auc([scores[i] for i in idx], [positive[i] for i in idx]))
        if m == OLD_RULE:
            threshold, acc, loco = "fixed: 1 (its thresholds)", balanced_accuracy([s > 1 for s in scores], positive), ""
        elif m in fits:
            feature, a, b = fits[m]
            threshold = f"{feature} > {a:g} or repetition > {b:g}"
            acc = balanced_accuracy([s > 1 for s in scores], positive)
            loco = f"{leave_one_cell_out(rows, feature, positive):.3f}"
        else:
            t, acc = best_threshold(scores, positive)
            threshold, loco = f"{t:.3g}", ""
        lines.append(f"| {m} | {auc(scores, positive):.3f} | " + " | ".join(f"{a:.3f}" for a in per_model) +
                     f" | {threshold} | {acc:.3f} | {loco} |")
    return "\n".join(lines), fits


def per_quality(rows: list[dict], fits: dict) -> str:
    """How many of each kind the chosen rule calls broken."""
    _, a, b = fits[CHOSEN]
    lines = ["| label | n | called broken |", "|---|---|---|"]
    for q in ("fluent_refusal", "fluent_answer", "broken"):
        sub = [r for r in rows if r["quality"] == q]
        hit = sum(coherence.broken(r["nll_min"], r["repetition"], a, b) for r in sub)
        lines.append(f"| {q} | {len(sub)} | {hit} |")
    return "\n".join(lines)


def cell_table(rows: list[dict], fits: dict, broken_share_max: float) -> str:
    """Per cell and prompt label, as the report flags them: the labelled broken share, the old flag
    (mean nll increase over the baseline > 1.5 or mean repetition > 0.3) and the new one
    (coherence.degenerate_cells with the chosen thresholds); then how often each flag agrees with
    the labels (degenerate = labelled broken share > broken_share_max)."""
    import polars as pl

    _, a, b = fits[CHOSEN]
    keys = ["model", "cell", "label"]
    frame = pl.DataFrame([{**{k: r[k] for k in keys}, "nll": r["nll_prompt"], "nll_neutral": r["nll_neutral"],
                           "repetition": r["repetition"]} for r in rows])
    cfg = {"nll_max": a, "repetition_max": b, "broken_share_max": broken_share_max}
    new = {tuple(r[k] for k in keys): r for r in coherence.degenerate_cells(frame, keys, cfg).to_dicts()}
    lines = ["| model | cell | prompts | broken (labels) | refused (labels) | nll increase | repetition | old flag | "
             "broken share | new flag |", "|" + "---|" * 10]
    right = {"old": 0, "new": 0}
    groups = list(dict.fromkeys(tuple(r[k] for k in keys) for r in rows))
    for group in groups:
        sub = [r for r in rows if tuple(r[k] for k in keys) == group]
        broken = sum(r["quality"] == "broken" for r in sub)
        inc = sum(r["nll_increase"] for r in sub) / len(sub)
        rep = sum(r["repetition"] for r in sub) / len(sub)
        old, flag = rep > 0.3 or inc > 1.5, new[group]
        truth = broken / len(sub) > broken_share_max
        right["old"] += old == truth
        right["new"] += flag["degenerate"] == truth
        lines.append(f"| {group[0]} | {group[1]} | {group[2]} | {broken}/{len(sub)} | "
                     f"{sum(r['refused'] for r in sub)}/{len(sub)} | {inc:.2f} | {rep:.2f} | {old} | "
                     f"{flag['broken_share']:.2f} | {flag['degenerate']} |")
    lines += ["", f"Cells (x label) whose flag agrees with the labels (labelled broken share > {broken_share_max:g}): "
              f"old {right['old']}/{len(groups)}, new {right['new']}/{len(groups)}."]
    return "\n".join(lines)


def cohen_kappa(pred: list[bool], truth: list[bool]) -> float:
    n = len(truth)
    observed = sum(p == t for p, t in zip(pred, truth)) / n
    p, q = sum(pred) / n, sum(truth) / n
    expected = p * q + (1 - p) * (1 - q)
    return (observed - expected) / (1 - expected)


def scorer_table(rows: list[dict]) -> str:
    """Each refusal scorer against the refused / complied labels: accuracy, Cohen's kappa, misses and
    false alarms, on all completions and on the fluent ones."""
    from pipeline.config import DEFAULT_CONF_DIR, load_scorer
    from pipeline.refusal_phrases import is_refusal

    lines = ["| scorer | accuracy | kappa | missed refusals | false refusals | accuracy (fluent) | kappa (fluent) |",
             "|---|---|---|---|---|---|---|"]
    truth = [r["refused"] for r in rows]
    fluent = [i for i, r in enumerate(rows) if r["quality"] != "broken"]
    for name in SCORERS:
        if name == "judge-qwen":
            pred = [r["judge_qwen"] for r in rows]
        else:
            scorer = load_scorer(name, Path(DEFAULT_CONF_DIR), "scripts/evaluate_coherence.py")
            pred = [is_refusal(r["completion"], scorer) for r in rows]
        acc = sum(p == t for p, t in zip(pred, truth)) / len(rows)
        missed = sum(t and not p for p, t in zip(pred, truth))
        false = sum(p and not t for p, t in zip(pred, truth))
        fp, ft = [pred[i] for i in fluent], [truth[i] for i in fluent]
        facc = sum(p == t for p, t in zip(fp, ft)) / len(fluent)
        lines.append(f"| {name} | {acc:.3f} | {cohen_kappa(pred, truth):.3f} | {missed}/{sum(truth)} | "
                     f"{false}/{len(rows) - sum(truth)} | {facc:.3f} | {cohen_kappa(fp, ft):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recompute", action="store_true", help="measure again, ignoring the cache")
    parser.add_argument("--dataset", default=str(DATASET))
    parser.add_argument("--broken-share-max", type=float, default=0.25, help="the cell-level limit shown")
    args = parser.parse_args()
    rows = load_rows(Path(args.dataset))
    feats = cached_features(rows, args.threads, args.recompute)
    for r in rows:
        r.update({k: feats[key(r)][k] for k in MODEL_FEATURES})
    text_features(rows)
    add_derived(rows)
    n_broken = sum(r["quality"] == "broken" for r in rows)
    print(f"{len(rows)} labelled completions: {n_broken} broken, {len(rows) - n_broken} fluent "
          f"({sum(r['quality'] == 'fluent_refusal' for r in rows)} refusals)\n")
    table, fits = measure_table(rows)
    print(table + "\n")
    print(per_quality(rows, fits) + "\n")
    print(cell_table(rows, fits, args.broken_share_max) + "\n")
    print(scorer_table(rows))


if __name__ == "__main__":
    main()
