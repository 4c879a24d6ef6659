"""``dar fid``: FID, sFID, Inception Score and precision/recall of an ADM-format sample npz.

The computation follows ADM's evaluator (``guided-diffusion/evaluations``), on the FID
Inception of :mod:`dar_core.evaluation.inception`:

* **FID** between Gaussian fits of ``pool_3`` features (2048). The Fréchet distance is
  :func:`dar_core.evaluation.metrics.frechet_distance_from_stats` (square roots of symmetric
  PSD matrices through ``eigh``); ``tests/test_fid.py`` checks it against ``scipy.linalg.sqrtm``.
* **sFID**: the same on the spatial features (first 7 channels of ``mixed_6/conv``, 2023).
* **IS**: ``exp(E[KL(p(y|x) || p(y))])`` over the 1008-way softmax of the bias-free logits,
  on consecutive chunks of 5000 samples, averaged (ADM's ``split_size=5000``).
* **Precision / recall**: the k-NN manifold estimate of Kynkäänniemi et al. (2019), k = 3,
  on ``pool_3`` features with squared Euclidean distances: a sample is *precise* if it lies
  within the k-th-neighbour radius of some reference image; a reference image is *recalled*
  if it lies within the radius of some sample. Needs the reference images (``arr_0``).

Reference: any npz with ``arr_0`` uint8 ``[N, H, W, 3]``, or ADM's reference batches, whose
stored ``mu``/``sigma`` (and ``mu_s``/``sigma_s``) are used for FID/sFID as ADM does, with
``arr_0`` for precision/recall. Statistics computed here are cached beside the reference
(``REF.npz.dar-inception-<weights>.npz``, written atomically), keyed by the SHA-256 of the
reference file and of the Inception weights.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dar_core.errors import ConfigError, InputError
from dar_core.evaluation.inception import InceptionFeatures, file_sha256, user_cache
from dar_core.evaluation.metrics import frechet_distance_from_stats, gaussian_stats
from dar_core.io.checkpoint import atomic_write_bytes, writable_parent

PAPER_SAMPLES = 50_000
IS_SPLIT = 5000
PR_K = 3
READ_BATCH = 500


# ---------------------------------------------------------------------------- reading
def _header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"npy format version {version} is not supported")
    shape, _, dtype = read(f)
    return tuple(shape), dtype


def npz_keys(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``name -> (shape, dtype)`` of every array in an npz, read from the headers only."""
    if not path.is_file():
        raise InputError(f"no npz file at {str(path)!r}")
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for name in zf.namelist():
                with zf.open(name) as f:
                    out[name.removesuffix(".npy")] = _header(f)
            return out
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise InputError(f"{str(path)!r} is not a readable npz ({type(e).__name__}: "
                         f"{str(e)[:120]})") from None


def iter_images(path: Path, batch: int = READ_BATCH) -> Iterator[np.ndarray]:
    """``arr_0`` of an npz in uint8 ``[b, H, W, 3]`` batches, one batch in memory at a time."""
    keys = npz_keys(path)
    if "arr_0" not in keys:
        raise InputError(f"{str(path)!r} has no 'arr_0' (keys {sorted(keys)}); expected ADM's "
                         "uint8 [N, H, W, 3] images")
    shape, dtype = keys["arr_0"]
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise InputError(f"{str(path)!r}: arr_0 is {dtype} {list(shape)}, expected uint8 "
                         "[N, H, W, 3] (NHWC, as `dar sample --num-samples` writes)")
    per = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        _header(f)
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            buf = f.read(n * per)
            if len(buf) != n * per:
                raise InputError(f"{str(path)!r}: arr_0 is truncated at image {start}")
            yield np.frombuffer(buf, np.uint8).reshape(n, *shape[1:])


def image_features(path: Path, inception: InceptionFeatures) -> dict[str, np.ndarray]:
    parts = [inception(b) for b in iter_images(path)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------- metrics
def inception_score(logits: np.ndarray, split: int = IS_SPLIT) -> float:
    """ADM's IS: mean over consecutive chunks of ``split`` of ``exp(mean KL(p(y|x)||p(y)))``."""
    z = np.asarray(logits, np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))  # log softmax
    scores = []
    for s in range(0, len(z), split):
        lp = logp[s:s + split]
        p = np.exp(lp)
        log_marg = np.log(p.mean(axis=0))
        scores.append(float(np.exp(np.mean(np.sum(p * (lp - log_marg), axis=1)))))
    return float(np.mean(scores))


def _sq_dists(a: Any, b: Any) -> Any:
    """Squared Euclidean distances ``[len(a), len(b)]`` of torch float rows."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def _radii(f: Any, k: int, block: int) -> Any:
    """Distance² from each row to its k-th nearest other row (the row itself is index 0)."""
    import torch

    out = torch.empty(len(f), dtype=f.dtype, device=f.device)
    for s in range(0, len(f), block):
        out[s:s + block] = torch.topk(_sq_dists(f[s:s + block], f), k + 1, dim=1,
                                      largest=False).values[:, k]
    return out


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = PR_K,
                     device: str = "cpu", block: int = 1024) -> tuple[float, float]:
    """Kynkäänniemi et al.'s improved precision and recall, float32 distances."""
    import torch

    if len(ref) <= k or len(samples) <= k:
        raise InputError(f"precision/recall with k={k} needs more than {k} reference images "
                         f"and samples, got {len(ref)} and {len(samples)}")
    r = torch.from_numpy(np.ascontiguousarray(ref, np.float32)).to(device)
    s = torch.from_numpy(np.ascontiguousarray(samples, np.float32)).to(device)
    r_rad, s_rad = _radii(r, k, block), _radii(s, k, block)
    precise = torch.zeros(len(s), dtype=torch.bool, device=device)
    recalled = torch.zeros(len(r), dtype=torch.bool, device=device)
    for i in range(0, len(s), block):
        d = _sq_dists(s[i:i + block], r)  # [b, N_ref]
        precise[i:i + block] = (d <= r_rad[None, :]).any(1)
        recalled |= (d <= s_rad[i:i + block, None]).any(0)
    return float(precise.double().mean()), float(recalled.double().mean())


# ---------------------------------------------------------------------------- reference
def reference_stats(ref: Path, inception: InceptionFeatures) -> dict[str, Any]:
    """``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (from the file where it stores them, as ADM's
    batches do) and ``pool`` features of ``arr_0`` (None without images), plus where each
    came from. Computed values are cached beside ``ref``."""
    keys = npz_keys(ref)
    stored = {k for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    if "arr_0" not in keys and not {"mu", "sigma"} <= stored:
        raise InputError(f"reference {str(ref)!r} has neither arr_0 images nor mu/sigma "
                         f"statistics (keys {sorted(keys)})")
    out: dict[str, Any] = {"pool": None, "n": keys["arr_0"][0][0] if "arr_0" in keys else None,
                           "source": {}}
    if "arr_0" in keys:
        ref_sha = file_sha256(ref)
        name = f"{ref.name}.dar-inception-{inception.sha256[:12]}.npz"
        # beside the reference, or in the user's cache where that folder is read-only
        places: tuple[Path, ...] = (ref.with_name(name),)
        try:
            places += (user_cache() / "refstats" / f"{ref_sha[:16]}-{name}",)
        except RuntimeError:  # no home directory to cache in
            pass
        cache, cached = places[0], None
        for place in places:
            cached = _read_cache(place, ref_sha, inception.sha256)
            if cached is not None:
                cache = place
                break
        if cached is None:
            f = image_features(ref, inception)
            cached = {"pool": f["pool"]}
            (cached["mu"], cached["sigma"]), (cached["mu_s"], cached["sigma_s"]) = (
                gaussian_stats(f["pool"]), gaussian_stats(f["spatial"]))
            cache = _write_cache(places, cached, ref_sha, inception.sha256)
        out.update({k: cached[k] for k in ("pool", "mu", "sigma", "mu_s", "sigma_s")})
        out["source"] = {k: "computed here" for k in ("fid", "sfid")}
        out["cache"] = None if cache is None else str(cache)
    with np.load(ref) as z:
        for m, c, what in (("mu", "sigma", "fid"), ("mu_s", "sigma_s", "sfid")):
            if m in stored and c in stored:
                out[m], out[c] = np.asarray(z[m], np.float64), np.asarray(z[c], np.float64)
                out["source"][what] = "stored in the reference (ADM: TensorFlow)"
    return out


def _read_cache(path: Path, ref_sha: str, weights_sha: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if str(z["ref_sha256"]) != ref_sha or str(z["weights_sha256"]) != weights_sha:
                return None
            return {k: z[k] for k in ("pool", "mu", "sigma", "mu_s", "sigma_s")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # recomputed and rewritten


def _write_cache(places: tuple[Path, ...], stats: dict[str, np.ndarray], ref_sha: str,
                 weights_sha: str) -> str | None:
    """Write the statistics to the first of ``places`` that takes them; where it went (None,
    with a warning, if none did: the numbers are right, only recomputed next time)."""
    buf = io.BytesIO()
    np.savez(buf, ref_sha256=np.str_(ref_sha), weights_sha256=np.str_(weights_sha), **stats)
    for path in places:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())
            return str(path)
        except OSError:
            continue
    print(f"dar fid: could not cache the reference statistics in {[str(p) for p in places]}; "
          "they are recomputed on every run", file=sys.stderr)
    return None


# ---------------------------------------------------------------------------- the command
def evaluate(samples: str, ref: str, *, inception: str | None = None, device: str = "auto",
             batch_size: int = 100) -> dict[str, Any]:
    """Every metric this module can compute for ``samples`` against ``ref``."""
    sp, rp = Path(samples), Path(ref)
    shape = npz_keys(sp).get("arr_0", ((0, 0, 0),))[0]  # name a bad file before Inception
    npz_keys(rp)
    net = InceptionFeatures(inception, device=device, batch_size=batch_size)
    r = reference_stats(rp, net)
    f = image_features(sp, net)
    n = len(f["pool"])
    if n < 2:
        raise InputError(f"{samples!r} holds {n} image(s); FID needs at least 2")
    if r["mu"].shape != (f["pool"].shape[1],):
        raise InputError(f"reference mu has shape {list(r['mu'].shape)}, expected "
                         f"[{f['pool'].shape[1]}] (pool_3 features)")
    res: dict[str, Any] = {"samples": str(sp), "ref": str(rp), "num_samples": n}
    res["fid"] = frechet_distance_from_stats(*gaussian_stats(f["pool"]), r["mu"], r["sigma"])
    if "mu_s" in r:
        res["sfid"] = frechet_distance_from_stats(*gaussian_stats(f["spatial"]), r["mu_s"],
                                                  r["sigma_s"])
    res["inception_score"] = inception_score(f["logits"])
    if r["pool"] is not None and min(n, len(r["pool"])) > PR_K:
        res["precision"], res["recall"] = precision_recall(r["pool"], f["pool"],
                                                           device=str(net.device))
    with np.load(sp) as z:
        res["settings"] = json.loads(str(z["settings"][0])) if "settings" in z.files else None
    res.update(ref_images=r["n"], ref_source=r["source"], inception=str(net.path),
               inception_sha256=net.sha256, inception_standard=net.standard,
               image_size=list(shape[1:3]))
    return res


def protocol_notes(res: dict[str, Any]) -> list[str]:
    """How these numbers relate to the paper's protocol (FID-50K, ADM reference batch)."""
    n, notes = res["num_samples"], []
    if n != PAPER_SAMPLES:
        notes.append(f"{n} samples, not the paper's {PAPER_SAMPLES:,}: FID is biased upward at "
                     "small N (and IS/sFID shift), so compare only at equal N")
    src = res["ref_source"].get("fid", "")
    notes.append(f"reference {res['ref']} ({res['ref_images'] or 'no'} images; FID stats "
                 f"{src}); papers use ADM's VIRTUAL_imagenet256_labeled.npz")
    h, w = res["image_size"]
    notes.append(f"{h}x{w} images resized to 299x299 by TF1 bilinear (as in ADM's graph); "
                 "features from the PyTorch port of the TF Inception: close to, not bitwise "
                 "equal to, TensorFlow's (not checked against TensorFlow here)")
    if not res["inception_standard"]:
        notes.append(f"Inception weights {res['inception']} are NOT the standard FID file "
                     "(sha256 prefix differs): these numbers compare with nothing published")
    if "sfid" not in res:
        notes.append("no sFID: the reference has neither images nor mu_s/sigma_s")
    if "precision" not in res:
        notes.append(f"no precision/recall: it needs the reference images (arr_0) and more "
                     f"than k={PR_K} of them and of the samples")
    s = res.get("settings")
    if s is None:
        notes.append("the samples carry no settings (not written by dar sample)")
    else:
        gi = s.get("guidance_interval", [0.0, 1.0])
        notes.append(f"samples: {s['sampler']} {s['steps']} steps, cfg {s['cfg_scale']:g} on t "
                     f"in [{gi[0]:g}, {gi[1]:g}], {s['weights']} weights, {s['precision']}, "
                     f"seed {s['seed']}, {s.get('labels', '?')} labels, step {s['step']}")
    return notes


def cmd_fid(args: Any) -> None:
    if args.out:
        writable_parent(args.out)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    res = evaluate(args.samples, args.ref, inception=args.inception, device=args.device,
                   batch_size=args.batch_size)
    line = [f"FID {res['fid']:.3f}"]
    line += [f"sFID {res['sfid']:.3f}"] if "sfid" in res else []
    line += [f"IS {res['inception_score']:.2f}"]
    if "precision" in res:
        line += [f"precision {res['precision']:.4f}", f"recall {res['recall']:.4f}"]
    print(f"{args.samples}: " + "  ".join(line))
    res["protocol"] = protocol_notes(res)
    for note in res["protocol"]:
        print(f"  note: {note}")
    if args.out:
        atomic_write_bytes(args.out, json.dumps(res, indent=1).encode())
        print(f"wrote {args.out}")
