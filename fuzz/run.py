"""Run a fuzz target: coverage-guided with atheris, or a plain mutation replay without it.

    python -m fuzz.run gguf                       # atheris until stopped; findings in fuzz/findings/
    python -m fuzz.run lora -runs=300000          # any libFuzzer option passes through
    python -m fuzz.run fp8 --replay 500           # no atheris: seeds plus 500 seeded mutations
    python -m fuzz.run gguf fuzz/findings/gguf-crash-…   # run one saved input again

Targets: safetensors, folder, gguf, lora, fp8, sampler-inputs, verify-baseline, imatrix, vae-config, svdquant,
recipe, manifest
(see ``fuzz/targets.py``).
The corpus starts from files qconvert writes (``fuzz/corpus/NAME``, made on
first use).  A finding is any exception other than ``QConvertError``, an
input that takes more than ``-timeout`` seconds (5), or memory beyond
``-rss_limit_mb`` (the process's start-up plus about 1 GB).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 5
# torch, numpy and gguf take ~260 MB before the first input; a finding is ~1 GB on top.
RSS_LIMIT_MB = 1300


def corpus(name: str, folder: Path | None = None) -> Path:
    """fuzz/corpus/NAME (or ``folder``), seeded with qconvert's own files the first time."""
    from fuzz.targets import hostile_seeds, seeds

    folder = folder or HERE / "corpus" / name
    if not folder.is_dir() or not any(folder.iterdir()):
        folder.mkdir(parents=True, exist_ok=True)
        good = seeds(name)
        for i, data in enumerate(good):
            (folder / f"seed-{i}").write_bytes(data)
        for i, data in enumerate(hostile_seeds(name, good)):  # the classes found by hand, refused cleanly
            (folder / f"hostile-{i}").write_bytes(data)
    return folder


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """One to four random edits of the kinds libFuzzer makes, biased towards headers."""
    buf = bytearray(data)
    interesting = [b"0", b"-1", b"18446744073709551615", b"9" * 40, b"[]", b"{}", b'"', b"\\ud800", b"[[[[",
                   b"null", b"true", b"1e999", b"\x00", b"\xff" * 8, b"\xff\xff\xff\x7f", b"..", b"/"]
    for _ in range(rng.randint(1, 4)):
        head = min(len(buf), 4096) or 1
        at = rng.randrange(head)
        op = rng.randrange(6)
        if op == 0 and buf:
            buf[at % len(buf)] = rng.randrange(256)
        elif op == 1:
            buf[at:at] = rng.choice(interesting)
        elif op == 2 and buf:
            del buf[at:at + rng.randint(1, 16)]
        elif op == 3:
            other = rng.choice(pool)
            i = rng.randrange(len(other) or 1)
            buf[at:at] = other[i:i + rng.randint(1, 64)]
        elif op == 4 and buf:
            n = rng.randint(1, 8)
            buf[at:at + n] = rng.choice(interesting)
        else:
            digits = [i for i in range(min(len(buf), 4096)) if 48 <= buf[i] <= 57]
            if digits:
                i = rng.choice(digits)
                buf[i:i + 1] = str(rng.choice([0, 1, 7, 255, 65536, 2**31, 2**63, 10**30])).encode()
    return bytes(buf)


def replay(name: str, count: int, seed: int = 0, *, log=print, folder: Path | None = None,
           findings_dir: Path | None = None) -> int:
    """Seeds and ``count`` mutations through the target, without atheris.  Returns the findings."""
    from fuzz.targets import TARGETS

    target = TARGETS[name]
    pool = [p.read_bytes() for p in sorted(corpus(name, folder).iterdir())]
    rng = random.Random(seed)
    base_rss = _rss_mb()
    findings = 0
    from fuzz.mutators import MUTATORS

    structured = MUTATORS.get(name)

    def one() -> bytes:
        data = rng.choice(pool)
        if structured is None or rng.random() < 0.3:
            return mutate(data, rng, pool)
        return structured(data, 1 << 20, rng.randrange(2 ** 32), lambda d, n: mutate(d, rng, pool)[:n])

    inputs = [*pool, *(one() for _ in range(count))]
    for i, data in enumerate(inputs):
        start = time.monotonic()
        try:
            target(data)
        except Exception as exc:  # a finding: keep the input
            findings += 1
            path = _save(name, data, findings_dir)
            log(f"finding {findings}: input {i}: {type(exc).__name__}: {str(exc)[:200]} -> {path}")
            continue
        took = time.monotonic() - start
        if took > TIMEOUT_S:
            findings += 1
            log(f"finding {findings}: input {i} took {took:.1f} s -> {_save(name, data, findings_dir)}")
    grown = _rss_mb() - base_rss
    if grown > 1024:
        findings += 1
        log(f"finding {findings}: peak memory grew by {grown:.0f} MB")
    log(f"{name}: {len(inputs)} inputs, {findings} findings")
    return findings


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save(name: str, data: bytes, folder: Path | None = None) -> Path:
    import hashlib

    folder = folder or HERE / "findings"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{hashlib.sha1(data).hexdigest()[:12]}"
    path.write_bytes(data)
    return path


def fuzz(name: str, libfuzzer_args: list[str], folder: Path | None = None, findings_dir: Path | None = None) -> None:
    import atheris

    # Instrument qconvert and gguf-py (the code under test), not torch or numpy.
    with atheris.instrument_imports(include=["qconvert", "gguf"]):
        import gguf  # noqa: F401

        import qconvert.cli  # noqa: F401
        import qconvert.core.checkpoint  # noqa: F401
        import qconvert.core.lora  # noqa: F401
        import qconvert.formats.calibration  # noqa: F401
        import qconvert.formats.comfyui.fp8  # noqa: F401
        import qconvert.formats.comfyui.loader  # noqa: F401
        import qconvert.formats.gguf.reader  # noqa: F401
        import qconvert.formats.gguf.writer  # noqa: F401
        import qconvert.formats.inspection  # noqa: F401
        import qconvert.formats.svdquant.file  # noqa: F401
        import qconvert.running.inputs  # noqa: F401
        import qconvert.running.verify  # noqa: F401
    from fuzz.targets import TARGETS

    target = TARGETS[name]
    folder = corpus(name, folder)
    findings_dir = findings_dir or HERE / "findings"
    if name in ("lora", "sampler-inputs", "imatrix"):
        from fuzz.targets import _lora_model, _runnable_model

        _lora_model()
        _runnable_model()  # made before the first input, not timed as part of it
    findings_dir.mkdir(parents=True, exist_ok=True)
    max_len = 1 << 20 if name == "svdquant" else 262144  # the smallest SVDQuant model is ~0.7 MB
    defaults = [f"-timeout={TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", f"-max_len={max_len}",
                f"-artifact_prefix={findings_dir}/{name}-"]
    given = {a.split("=")[0] for a in libfuzzer_args}
    args = [a for a in defaults if a.split("=")[0] not in given] + libfuzzer_args
    dictionary = HERE / "dicts" / f"{name}.dict"
    if dictionary.is_file() and "-dict" not in given:
        args.append(f"-dict={dictionary}")
    from fuzz.mutators import MUTATORS

    mutator = MUTATORS.get(name)
    custom = {} if mutator is None else {
        "custom_mutator": lambda data, max_size, seed: mutator(data, max_size, seed, atheris.Mutate)}
    # Files given on the command line are replayed (libFuzzer runs each once); else fuzz the corpus.
    inputs = [] if any(not a.startswith("-") for a in libfuzzer_args) else [str(folder)]
    atheris.Setup([sys.argv[0], *args, *inputs], target, **custom)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    from fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--replay", type=int, metavar="N", help="no atheris: seeds plus N seeded mutations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, help="corpus folder (default fuzz/corpus/TARGET)")
    parser.add_argument("--findings", type=Path, help="where findings go (default fuzz/findings)")
    args, rest = parser.parse_known_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.replay is not None:
        return 1 if replay(args.target, args.replay, args.seed, folder=args.corpus, findings_dir=args.findings) else 0
    fuzz(args.target, rest, args.corpus, args.findings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
