"""Bad input, as a table: each case is one clear line naming the file and the key, raised while the
config is loaded (before any model loads), with nothing written.

A case is (overrides, edits, file, key): `edits` rewrite files of a private copy of conf/ as
(relative path, old text, new text); old text None appends, a missing file is created.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_experiment
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = "experiment=tiny"
CHAT = "model/tiny-chat.yaml"
IV = "intervention/small.yaml"
DS = "dataset/own-harmful.yaml"


def iv(text):
    return [(IV, "ALL", text)]


def chat(old, new):
    return [(CHAT, old, new)]


def dataset_file(lines: bytes, extra: str = ""):
    """Point own-harmful at a prompt file with these bytes."""
    return [("data/bad.jsonl", "BYTES", lines), (DS, "ALL", "path: {conf}/data/bad.jsonl\nfield: instruction\n" + extra)]


CASES = {
    # experiment keys: types, ranges, unknown keys
    "max_new_tokens 0": (["experiment.generation.max_new_tokens=0"], [], "experiment/tiny.yaml",
                         "generation.max_new_tokens"),
    "generation batch 0": (["experiment.generation.batch_size=0"], [], "experiment/tiny.yaml", "generation.batch_size"),
    "generation batch negative": (["experiment.generation.batch_size=-4"], [], "experiment/tiny.yaml",
                                  "generation.batch_size"),
    "generation batch text": (["experiment.generation.batch_size=many"], [], "experiment/tiny.yaml",
                              "generation.batch_size"),
    "activations batch 0": (["experiment.activations.batch_size=0"], [], "experiment/tiny.yaml",
                            "activations.batch_size"),
    "activations dtype": (["experiment.activations.dtype=float64"], [], "experiment/tiny.yaml", "activations.dtype"),
    "typo in experiment block": (["+experiment.generaton={max_new_tokens:3}"], [], "experiment/tiny.yaml",
                                 "generaton"),
    "unknown experiment key": (["+experiment.foo=1"], [], "experiment/tiny.yaml", "foo"),
    "unknown top-level key": (["+foo=1"], [], "conf/config.yaml", "foo"),
    "unknown device": (["experiment.device=tpu"], [], "experiment/tiny.yaml", "device"),
    "threads 0": (["experiment.threads=0"], [], "experiment/tiny.yaml", "threads"),
    "train 0": (["experiment.split.train=0"], [], "experiment/tiny.yaml", "split.train"),
    "negative seed": (["experiment.split.seed=-1"], [], "experiment/tiny.yaml", "split.seed"),
    "split as text": (["experiment.split.test=abc"], [], "experiment/tiny.yaml", "split.test"),
    "split as float": (["experiment.split.test=4.5"], [], "experiment/tiny.yaml", "split.test"),
    "name is a path": (["experiment.name=../../x"], [], "experiment/tiny.yaml", "name"),
    "no models": (["experiment.models=[]"], [], "experiment/tiny.yaml", "models"),
    "model name is a path": (["experiment.models=[../../x]"], [], "experiment/tiny.yaml", "models[0]"),
    "unknown model": (["experiment.models=[tiny-chat,nope]"], [], "experiment/tiny.yaml", "models[1]"),
    "model twice": (["experiment.models=[tiny-chat,tiny-chat]", "experiment.pairs=[]"], [], "experiment/tiny.yaml",
                    "models[1]"),
    "pair with unknown model": (["experiment.pairs=[{base:tiny-base,chat:nope}]"], [], "experiment/tiny.yaml",
                                "pairs[0].chat"),
    "pair without chat": (["experiment.pairs=[{base:tiny-base}]"], [], "experiment/tiny.yaml", "pairs[0].chat"),
    "unknown source": (["experiment.direction.sources=[self,partner]"], [], "experiment/tiny.yaml",
                       "direction.sources[1]"),
    "unknown select": (["experiment.direction.select=maybe"], [], "experiment/tiny.yaml", "direction.select"),
    "quoted boolean filter": (['experiment.direction.filter="false"'], [], "experiment/tiny.yaml",
                              "direction.filter"),
    "typo in selection": (["+experiment.direction.selection.kl_maxx=1"], [], "experiment/tiny.yaml",
                          "direction.selection.kl_maxx"),
    "NaN kl_max": (["experiment.direction.selection.kl_max=nan"], [], "experiment/tiny.yaml",
                   "direction.selection.kl_max"),
    "inf induce_min": (["experiment.direction.selection.induce_min=inf"], [], "experiment/tiny.yaml",
                       "direction.selection.induce_min"),
    "selection layer out of range": (["+experiment.direction.selection.layers=[0,9]"], [], "experiment/tiny.yaml",
                                     "direction.selection.layers"),
    "selection position positive": (["+experiment.direction.selection.positions=[1]"], [], "experiment/tiny.yaml",
                                    "direction.selection.positions[0]"),
    "force unknown model": (["+experiment.direction.force=[{model:nope,layer:1}]"], [], "experiment/tiny.yaml",
                            "direction.force[0].model"),
    "force layer out of range": (["+experiment.direction.force=[{model:tiny-chat,layer:7}]"], [],
                                 "experiment/tiny.yaml", "direction.force[0].layer"),
    "force position 0": (["+experiment.direction.force=[{model:tiny-chat,layer:1,position:0}]"], [],
                         "experiment/tiny.yaml", "direction.force[0].position"),
    "NaN sweep coefficient": (["experiment.sweep.coefficients=[nan]"], [], "experiment/tiny.yaml",
                              "sweep.coefficients[0]"),
    "no sweep coefficient": (["experiment.sweep.coefficients=[]"], [], "experiment/tiny.yaml", "sweep.coefficients"),
    "sweep coefficient as text": (["experiment.sweep.coefficients=[two]"], [], "experiment/tiny.yaml",
                                  "sweep.coefficients[0]"),
    "sweep layer out of range": (["experiment.sweep.extraction_layers={start:0,stop:12}"], [], "experiment/tiny.yaml",
                                 "sweep.extraction_layers"),
    "sweep range reversed": (["experiment.sweep.extraction_layers={start:3,stop:1}"], [], "experiment/tiny.yaml",
                             "sweep.extraction_layers"),
    "sweep unknown model": (["+experiment.sweep.models=[nope]"], [], "experiment/tiny.yaml", "sweep.models[0]"),
    "sweep position 0": (["+experiment.sweep.position=0"], [], "experiment/tiny.yaml", "sweep.position"),
    "sweep top negative": (["experiment.sweep.generate.top=-1"], [], "experiment/tiny.yaml", "sweep.generate.top"),
    "sweep cell layer out of range": (["experiment.sweep.generate.cells=[{layer:9,addition_layer:1,coefficient:2.0}]"],
                                      [], "experiment/tiny.yaml", "sweep.generate.cells[0].layer"),
    "sweep batch 0": (["+experiment.sweep.batch_size=0"], [], "experiment/tiny.yaml", "sweep.batch_size"),
    "sweep without val prompts": (["experiment.split.val=0"], [], "experiment/tiny.yaml", "split.val"),
    "negative nll prompts": (["+experiment.coherence.nll_prompts=-1"], [], "experiment/tiny.yaml",
                             "coherence.nll_prompts"),
    "inf repetition threshold": (["+experiment.coherence.repetition_max=inf"], [], "experiment/tiny.yaml",
                                 "coherence.repetition_max"),
    "unknown coherence key": (["+experiment.coherence.foo=1"], [], "experiment/tiny.yaml", "coherence.foo"),
    "capability n 0": (["+experiment.capability.n=0"], [], "experiment/tiny.yaml", "capability.n"),
    "capability reference missing": (["+experiment.capability.reference=missing.jsonl"], [], "experiment/tiny.yaml",
                                     "capability.reference"),
    "quoted capability flag": (['+experiment.capability.enabled="no"'], [], "experiment/tiny.yaml",
                               "capability.enabled"),
    "unknown dataset": (["experiment.datasets.harmful=nope"], [], "experiment/tiny.yaml", "datasets.harmful"),
    "split mapping without train": (["experiment.datasets.harmful={test:own-harmful}"], [], "experiment/tiny.yaml",
                                    "datasets.harmful.train"),
    "unknown intervention set": (["experiment.interventions=nope"], [], "experiment/tiny.yaml", "interventions"),
    "unknown scorer": (["experiment.scoring=nope"], [], "experiment/tiny.yaml", "scoring"),
    "unknown experiment": (["experiment=nope"], [], "conf/config.yaml", "overrides"),
    "cuda without a GPU": (["experiment.device=cuda"], [], "experiment/tiny.yaml", "device"),
    # model YAML
    "quoted trust_remote_code": ([], chat("add_bos: false", "add_bos: false\ntrust_remote_code: \"false\""), CHAT,
                                 "trust_remote_code"),
    "quoted add_bos": ([], chat("add_bos: false", 'add_bos: "false"'), CHAT, "add_bos"),
    "typo add_bso": ([], chat("add_bos: false", "add_bso: false"), CHAT, "add_bso"),
    "no refusal tokens": ([], chat('refusal_tokens: ["I"]', "refusal_tokens: []"), CHAT, "refusal_tokens"),
    "empty refusal token": ([], chat('refusal_tokens: ["I"]', 'refusal_tokens: [""]'), CHAT, "refusal_tokens[0]"),
    "refusal tokens not a list": ([], chat('refusal_tokens: ["I"]', "refusal_tokens: I"), CHAT, "refusal_tokens"),
    "forced layer out of range": ([], chat("direction: {layer: 2, position: -1}",
                                           "direction: {layer: 12, position: -1, force: true}"), CHAT,
                                  "direction.layer"),
    "forced without a layer": ([], chat("direction: {layer: 2, position: -1}", "direction: {force: true}"), CHAT,
                               "direction.layer"),
    "model position 0": ([], chat("direction: {layer: 2, position: -1}", "direction: {layer: 2, position: 0}"),
                         CHAT, "direction.position"),
    "quoted force": ([], chat("direction: {layer: 2, position: -1}", 'direction: {layer: 2, force: "yes"}'), CHAT,
                     "direction.force"),
    "model dtype": ([], chat("add_bos: false", "add_bos: false\ndtype: float64"), CHAT, "dtype"),
    "model role": ([], chat("role: chat", "role: critic"), CHAT, "role"),
    "unknown device_map strategy": ([], chat("add_bos: false", "add_bos: false\ndevice_map: everywhere"), CHAT,
                                    "device_map"),
    "device_map on disk without a folder": ([], chat("add_bos: false", "add_bos: false\ndevice_map: {lm_head: disk}"),
                                            CHAT, "offload_folder"),
    "no source kind": ([], [(CHAT, "ALL", "source: {hidden_size: 64}\ntemplate: chatml\nrefusal_tokens: [I]\n")],
                       CHAT, "source"),
    "two source kinds": ([], [(CHAT, "ALL", "source: {hub: a/b, path: /tmp}\ntemplate: chatml\n"
                                            "refusal_tokens: [I]\n")], CHAT, "source"),
    "unknown template": ([], chat("template: chatml", "template: nope"), CHAT, "template"),
    "typo in random_init": ([], chat("seed: 0", "sed: 0"), CHAT, "source.random_init.sed"),
    "bad sha256": (["experiment.models=[tiny-chat,gemma-3-270m]", "experiment.pairs=[]"], [("model/gemma-3-270m.yaml", "sha256: a5fd3b62", "sha256: zz")], "model/gemma-3-270m.yaml",
                   "source.sha256"),
    "GGUF part missing": (["experiment.models=[gemma-3-270m]", "experiment.pairs=[]"],
                          [("model/gemma-3-270m.yaml", "part03", "part99")], "model/gemma-3-270m.yaml",
                          "source.gguf_parts[3]"),
    "pair of different widths": (["experiment.models=[tiny-chat,gemma-3-270m]",
                                  "experiment.pairs=[{base:gemma-3-270m,chat:tiny-chat}]"], [],
                                 "experiment/tiny.yaml", "pairs[0]"),
    "model YAML not a mapping": ([], [(CHAT, "ALL", "- a\n- b\n")], CHAT, "-"),
    "model YAML syntax": ([], [(CHAT, "ALL", "source: [unclosed\n")], CHAT, "-"),
    # template YAML
    "template without slot": ([], [("template/chatml.yaml", "ALL", 'text: "<|im_start|>user\\n{prompt}\\n"\n')],
                              "template/chatml.yaml", "text"),
    "template ends at the slot": ([], [("template/chatml.yaml", "ALL", 'text: "user: {instruction}"\n')],
                                  "template/chatml.yaml", "text"),
    # intervention YAML
    "coefficient as text": ([], iv("addition: {coefficients: [two]}\n"), IV, "addition.coefficients[0]"),
    "NaN grid coefficient": ([], iv("addition: {coefficients: [.nan]}\n"), IV, "addition.coefficients[0]"),
    "ablation range past the last block": ([], iv("ablation: {layers: {start: 0, stop: 9}}\n"), IV,
                                           "ablation.layers.stop"),
    "ablation range reversed": ([], iv("ablation: {layers: {start: 2, stop: 1}}\n"), IV, "ablation.layers"),
    "quoted orthogonalization": ([], iv('orthogonalization: "true"\n'), IV, "orthogonalization"),
    "addition layer out of range": ([], iv("addition: {coefficients: [1.0], layer: {absolute: 9}}\n"), IV,
                                    "addition.layer.absolute"),
    "typo normalise": ([], iv("addition: {normalise: true}\n"), IV, "addition.normalise"),
    "range with orthogonalization": ([], iv("ablation: {layers: {start: 0, stop: 2}}\north" "ogonalization: true\n"),
                                     IV, "orthogonalization"),
    # scorer YAML
    "no phrases": ([], [("scoring/refusal-prefix.yaml", "ALL", "kind: prefix\nphrases: []\n")],
                   "scoring/refusal-prefix.yaml", "phrases"),
    "unknown scorer kind": ([], [("scoring/refusal-prefix.yaml", "ALL", "kind: oracle\nphrases: [x]\n")],
                            "scoring/refusal-prefix.yaml", "kind"),
    "quoted case_sensitive": ([], [("scoring/refusal-prefix.yaml", "ALL", 'phrases: [x]\ncase_sensitive: "no"\n')],
                              "scoring/refusal-prefix.yaml", "case_sensitive"),
    # several scorers (issue 16): a list, each scorer once and each a file
    "scorer listed twice": (["experiment.scoring=[refusal-prefix,refusal-substring,refusal-prefix]"], [],
                            "experiment/tiny.yaml", "scoring[2]"),
    "unknown scorer in a list": (["experiment.scoring=[refusal-prefix,nope]"], [], "experiment/tiny.yaml",
                                 "scoring[1]"),
    "empty scorer list": (["experiment.scoring=[]"], [], "experiment/tiny.yaml", "scoring"),
    "judge with prompt and chat_template": (["experiment.scoring=judge-qwen"],
                                            [("scoring/judge-qwen.yaml", None, "chat_template: {}\n")],
                                            "scoring/judge-qwen.yaml", "prompt"),
    "judge with neither prompt nor chat_template": (
        ["experiment.scoring=judge-bare"],
        [("scoring/judge-bare.yaml", "ALL", "kind: judge\nmodel: tiny-chat\nlabels: {refused: a, complied: b}\n")],
        "scoring/judge-bare.yaml", "prompt"),
    "chat_template on a phrase scorer": ([], [("scoring/refusal-prefix.yaml", None, "chat_template: {}\n")],
                                         "scoring/refusal-prefix.yaml", "chat_template"),
    "judge chat template not Jinja": (["experiment.scoring=[refusal-prefix,judge-llama-guard-2]"],
                                      [("model/llama-guard-2-8b.yaml", "{%- endfor -%}", "{%- endfro -%}")],
                                      "model/llama-guard-2-8b.yaml", "chat_template"),
    "offline judge neither cached nor prepared": (
        ["experiment.scoring=[refusal-prefix,judge-hub]"],
        [("model/hub-judge.yaml", "ALL", "source: {hub: nobody/uncached-judge}\nrole: judge\ntemplate: chatml\n"),
         ("scoring/judge-hub.yaml", "ALL", "kind: judge\nmodel: hub-judge\nchat_template: {}\n"
                                           "labels: {refused: safe, complied: unsafe}\n")],
        "model/hub-judge.yaml", "source.hub"),
    # dataset YAML and prompt files
    "malformed JSON line": ([], dataset_file(b'{"instruction": "a"}\n{"instruction": "b"}\n{"instruction": \n'),
                            DS, "path"),
    "not UTF-8": ([], dataset_file(b'{"instruction": "a"}\n{"instruction": "\xff\xfe"}\n'), DS, "path"),
    "empty prompt file": ([], dataset_file(b""), DS, "path"),
    "duplicate prompt": ([], dataset_file(b'{"instruction": "Do X"}\n{"instruction": "do  x"}\n'), DS, "path"),
    "duplicate id": ([], dataset_file(b'{"instruction": "a", "id": 1}\n{"instruction": "b", "id": 1}\n',
                                      "id_field: id\n"), DS, "id_field"),
    "field missing in a row": ([], dataset_file(b'{"instruction": "a"}\n{"text": "b"}\n'), DS, "field"),
    "line not an object": ([], dataset_file(b'{"instruction": "a"}\n["b"]\n'), DS, "path"),
    "path and hub_id": ([], [(DS, "ALL", "path: pkg:harmful.jsonl\nhub_id: a/b\n")], DS, "path"),
    "dataset file missing": ([], [(DS, "ALL", "path: data/does-not-exist.jsonl\n")], DS, "path"),
    "typo in dataset YAML": ([], [(DS, None, "fields: x\n")], DS, "fields"),
    # issue 17: YAML that does not parse names the file and the line (the experiment file too, which Hydra reads)
    "experiment YAML unclosed bracket": ([], [("experiment/tiny.yaml", "models: [tiny-chat, tiny-base]",
                                               "models: [tiny-chat, tiny-base")], "experiment/tiny.yaml", "-"),
    "experiment YAML tab": ([], [("experiment/tiny.yaml", None, "generation:\n\tmax_new_tokens: 3\n")],
                            "experiment/tiny.yaml", "-"),
    "experiment YAML not UTF-8": ([], [("experiment/tiny.yaml", "BYTES", b"name: tiny\n# \xff\n")],
                                  "experiment/tiny.yaml", "-"),
    "experiment YAML a list": ([], [("experiment/tiny.yaml", "ALL", "- tiny-chat\n- tiny-base\n")],
                               "experiment/tiny.yaml", "-"),
    "top-level config a list": ([], [("config.yaml", "ALL", "- experiment: tiny\n")], "conf/config.yaml", "-"),
    "model YAML tab": ([], chat("add_bos: false", "add_bos: false\nx:\n\ty: 1"), CHAT, "-"),
    "model YAML not UTF-8": ([], [(CHAT, "BYTES", b"role: chat\n# \xe9t\xe9\n")], CHAT, "-"),
    "intervention YAML a string": ([], iv("ablation\n"), IV, "-"),
    # ... overrides Hydra cannot parse
    "override with an unbalanced quote": (["experiment.name='tiny"], [], "conf/config.yaml", "overrides"),
    "override without a key": (["=tiny"], [], "conf/config.yaml", "overrides"),
    # ... grid cells whose files would collide, and pairs that mean nothing
    "coefficient twice": ([], iv("addition: {coefficients: [2.0, 2.0]}\n"), IV, "addition.coefficients[1]"),
    "coefficients that format alike": ([], iv("addition: {coefficients: [2.0, 2.0000001]}\n"), IV,
                                       "addition.coefficients[1]"),
    "sweep coefficient twice": (["experiment.sweep.coefficients=[2.0,4.0,2.0]"], [], "experiment/tiny.yaml",
                                "sweep.coefficients[2]"),
    "sweep cell twice": (["experiment.sweep.generate.cells=[{layer:2,addition_layer:1,coefficient:2.0},"
                          "{layer:2,addition_layer:1,coefficient:2.0}]"], [], "experiment/tiny.yaml",
                         "sweep.generate.cells[1]"),
    "pair declared twice": (["experiment.pairs=[{base:tiny-base,chat:tiny-chat},{base:tiny-base,chat:tiny-chat}]"],
                            [], "experiment/tiny.yaml", "pairs[1]"),
    "pair of a model with itself": (["experiment.pairs=[{base:tiny-chat,chat:tiny-chat}]"], [], "experiment/tiny.yaml",
                                    "pairs[0].chat"),
    "pair with roles swapped": (["experiment.pairs=[{base:tiny-chat,chat:tiny-base}]"], [], "experiment/tiny.yaml",
                                "pairs[0].base"),
    "pair whose chat is a base model": ([], [("model/tiny-chat.yaml", "role: chat", "role: base")],
                                        "experiment/tiny.yaml", "pairs[0].chat"),
    # ... sweeps that select nothing or more than exists
    "sweep offset outside every model": (["experiment.sweep.addition_offsets=[-1,7]"], [], "experiment/tiny.yaml",
                                         "sweep.addition_offsets"),
    "sweep top above its cells": (["experiment.sweep.generate.top=25"], [], "experiment/tiny.yaml",
                                  "sweep.generate.top"),
    "sweep spread above its cells": (["experiment.sweep.generate.spread=20"], [], "experiment/tiny.yaml",
                                     "sweep.generate.spread"),
    "sweep top_ablation above its layers": (["experiment.sweep.generate.top_ablation=5"], [], "experiment/tiny.yaml",
                                            "sweep.generate.top_ablation"),
    "addition offset past every selectable layer": (
        [], iv("addition: {coefficients: [1.0], layer: {offset: 4}}\n"), IV, "addition.layer.offset"),
    # ... model facts that contradict each other, and sources that are not models
    "hidden_size contradicts the config": ([], chat("  hidden_size: 64", "  hidden_size: 32"), CHAT,
                                           "source.hidden_size"),
    "no blocks": ([], chat("num_hidden_layers: 4", "num_hidden_layers: 0"), CHAT,
                  "source.random_init.config.num_hidden_layers"),
    "vocab smaller than bytes and specials": ([], chat("vocab_size: 400", "vocab_size: 3"), CHAT,
                                              "source.random_init.vocab_size"),
    "eos not a special token": ([], chat('eos: "<|im_end|>"', 'eos: "<|end|>"'), CHAT, "source.random_init.eos"),
    "vocab_size inside config": ([], chat("num_hidden_layers: 4", "num_hidden_layers: 4, vocab_size: 99"), CHAT,
                                 "source.random_init.config.vocab_size"),
    "source.path a plain file": ([], [("data/weights.bin", "BYTES", b"\0" * 16),
                                      (CHAT, "ALL", "source: {path: {conf}/data/weights.bin}\ntemplate: chatml\n"
                                                    "refusal_tokens: [I]\n")], CHAT, "source.path"),
    "source.path a folder without config": ([], [("data/empty/.keep", "BYTES", b""),
                                                 (CHAT, "ALL", "source: {path: {conf}/data/empty}\ntemplate: chatml\n"
                                                               "refusal_tokens: [I]\n")], CHAT, "source.path"),
    # ... scorer phrases that match everything or nothing
    "blank phrase": ([], [("scoring/refusal-prefix.yaml", "ALL", "kind: substring\nphrases: [sorry, ' ']\n")],
                     "scoring/refusal-prefix.yaml", "phrases[1]"),
    "empty phrase": ([], [("scoring/refusal-prefix.yaml", "ALL", "phrases: ['']\n")], "scoring/refusal-prefix.yaml",
                     "phrases[0]"),
    "prefix phrase after whitespace": ([], [("scoring/refusal-prefix.yaml", "ALL", "phrases: [' I cannot']\n")],
                                       "scoring/refusal-prefix.yaml", "phrases[0]"),
    # ... files the jobs would read, read now
    "capability reference not JSON": (["+experiment.capability.reference={conf}/config.yaml"], [],
                                      "experiment/tiny.yaml", "capability.reference"),
    # issue 17: absurd magnitudes
    "absurd raw coefficient": ([], iv("addition: {coefficients: [2.0, 1.0e+300]}\n"), IV, "addition.coefficients[1]"),
    "absurd unit coefficient": ([], iv("addition: {normalize: true, coefficients: [-1.0e+7]}\n"), IV,
                                "addition.coefficients[0]"),
    "absurd sweep coefficient": (["experiment.sweep.coefficients=[2.0,1e300]"], [], "experiment/tiny.yaml",
                                 "sweep.coefficients[1]"),
}


def apply(conf: Path, edits) -> None:
    for rel, old, new in edits:
        path = conf / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if old == "BYTES":
            path.write_bytes(new)
        elif old == "ALL":
            path.write_text(new.replace("{conf}", str(conf)))
        elif old is None:
            path.write_text(path.read_text() + new)
        else:
            text = path.read_text()
            assert old in text, (rel, old)
            path.write_text(text.replace(old, new, 1))


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


def expect_one_line(case, conf: Path, results: Path) -> ConfigError:
    """Load the tiny experiment with a case's overrides and edits: one ConfigError line naming its file and key,
    and no results folder. "{conf}" in an override or an edit is the conf copy's path."""
    overrides, edits, file, key = case
    apply(conf, edits)
    overrides = [o.replace("{conf}", str(conf)) for o in overrides]
    with pytest.raises(ConfigError) as err:
        load_experiment([TINY, f"results_dir={results}", *overrides], conf_dir=conf)
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text, text
    assert err.value.file.endswith(file), text
    assert err.value.key == key, text
    assert not results.exists()
    return err.value


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_file_and_key(case, conf_copy, tmp_path):
    expect_one_line(CASES[case], conf_copy, tmp_path / "results")


def test_results_dir_that_is_a_file(tmp_path):
    f = tmp_path / "results"
    f.write_text("not a folder")
    with pytest.raises(ConfigError) as err:
        load_experiment([TINY, f"results_dir={f}"])
    assert err.value.key == "results_dir" and "not a folder" in str(err.value)


def test_quoted_false_is_not_true(conf_copy):
    """The security hole the typed config closes: "false" used to be truthy."""
    apply(conf_copy, chat("add_bos: false", 'add_bos: false\ntrust_remote_code: "false"'))
    with pytest.raises(ConfigError, match="must be true or false"):
        load_experiment([TINY], conf_dir=conf_copy)


def test_an_unknown_key_suggests_the_close_one(conf_copy):
    apply(conf_copy, chat("add_bos: false", "add_bso: false"))
    with pytest.raises(ConfigError, match="did you mean 'add_bos'"):
        load_experiment([TINY], conf_dir=conf_copy)


@pytest.mark.parametrize("overrides,key", [
    ("experiment=tiny experiment.sweep.coefficients=[nan]", "sweep.coefficients[0]"),
    ("experiment=tiny +experiment.generaton={max_new_tokens:3}", "generaton"),
    ("experiment=tiny experiment.models=[../../x]", "models[0]"),
])
def test_snakemake_prints_one_line_and_writes_nothing(tmp_path, overrides, key):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1", "-d", str(tmp_path),
         "--config", f"overrides={overrides}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert len(lines) == 1 and f"key '{key}'" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], [".snakemake"])


@pytest.mark.parametrize("config,key", [
    (["overides=experiment=tiny"], "overides"),  # a typo: Snakemake alone would run the default experiment
    (["overrides=experiment=tiny", "cores=4"], "cores"),
    (["overrides=experiment=tiny experiment.name='my run"], "overrides"),  # unbalanced quote
])
def test_snakemake_config_keys_and_quoting(tmp_path, config, key):
    """What reaches the Snakefile through --config: its two keys only, and a string shlex can split."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1", "-d", str(tmp_path),
         "-n", "--config", *config], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert len(lines) == 1 and f"--config: key '{key}'" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], [".snakemake"])


@pytest.mark.parametrize("make", ["dangling", "read-only"])
def test_results_dir_that_cannot_be_created(tmp_path, make):
    import os

    if make == "dangling":
        (tmp_path / "gone").symlink_to(tmp_path / "missing")
        target = tmp_path / "gone" / "results"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "results"
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path no one can create
            target = Path("/proc/no-such-process/results")
    with pytest.raises(ConfigError) as err:
        load_experiment([TINY, f"results_dir={target}"])
    assert err.value.key == "results_dir" and "\n" not in str(err.value), str(err.value)
    assert not target.exists()
    assert not [p for p in tmp_path.rglob(".results-check-*")]


# ---- checks that need the tokenizer: in the first model job, before the weights load


def prompt_rows(text, dataset="own-harmful"):
    import polars as pl

    return pl.DataFrame({"instruction": [text], "prompt_id": ["p1"], "dataset": [dataset]})


def test_prompt_longer_than_the_context(tiny_dirs):
    from pipeline.models import context_length, load_tokenizer
    from pipeline.inputs import check_inputs
    from tests.conftest import tiny_spec

    spec = tiny_spec("tiny-chat")
    tok = load_tokenizer(spec, tiny_dirs["tiny-chat"])
    context = context_length(spec, tiny_dirs["tiny-chat"])
    assert context == 512
    check_inputs(tok, spec, prompt_rows("Explain how rain forms."), context, max_new_tokens=8)
    with pytest.raises(ConfigError) as err:
        check_inputs(tok, spec, prompt_rows("Explain how rain forms. " * 200), context)
    assert err.value.file == "conf/dataset/own-harmful.yaml" and "'p1'" in str(err.value)
    assert "context of 512" in str(err.value)


@pytest.mark.parametrize("edit,key", [
    ({"refusal_tokens": ["Ireallyrefuse"]}, "refusal_tokens[0]"),
    ({"direction": {"position": -40}}, "direction.position"),
])
def test_tokenizer_level_mistakes_name_the_model_yaml(tiny_dirs, edit, key):
    from pipeline.models import load_tokenizer
    from pipeline.inputs import check_inputs
    from pipeline.specs import ModelSpec
    from tests.conftest import tiny_spec

    spec = ModelSpec.model_validate({**tiny_spec("tiny-chat").model_dump(), **edit})
    with pytest.raises(ConfigError) as err:
        check_inputs(load_tokenizer(spec, tiny_dirs["tiny-chat"]), spec, prompt_rows("Hi."), 512)
    assert err.value.file.endswith("model/tiny-chat.yaml") and err.value.key == key, str(err.value)


def test_conf_reached_through_a_symlink(tmp_path):
    from pipeline.config import DEFAULT_CONF_DIR, load_model

    link = tmp_path / "conf"
    link.symlink_to(DEFAULT_CONF_DIR)
    assert load_model("tiny-chat", link, "test", "model").file == "conf/model/tiny-chat.yaml"
