"""Benchmark: Ray Data preprocessing vs a single-process loop doing identical work record by record
(LLaVA's ``LazySupervisedDataset`` style), on the same synthetic set, in one run.

    python bench/preprocess.py                 # 2000 records
    python bench/preprocess.py --n 4000 --workers 2

Images are drawn at COCO-like sizes (512-640 px, JPEG) and prepared for a CLIP ViT-L/14-336-sized
tower (336 px, 576 image tokens), so per-record work matches a real LLaVA-1.5 run. Both sides use the
same RecordProcessor, so they do the same work and produce the same bytes.

Two figures are printed:
- end to end: records / wall seconds of the whole job at N records (Ray: id scan, actor start-up,
  processing, Parquet writes; reference: read, process, streamed Parquet write). Imports are warmed first.
- steady state: the marginal rate between N and 2N records, (2N - N) / (T(2N) - T(N)), which cancels
  each side's fixed per-job cost and leaves the per-record throughput. Both sides are warmed by one
  untimed run first, so one-time costs (imports, Ray worker start) do not land in either timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def make_inputs(root: Path, n: int) -> tuple[Path, Path]:
    from llava_platform.data.synthetic import write_dataset
    from llava_platform.model.builder import save_model
    from llava_platform.model.presets import build_preset

    write_dataset(root / "synth", n=n, seed=0, n_eval=1, scale=4, image_format="jpg")
    records = json.loads((root / "synth" / "instruct.json").read_text())
    with_images = [r for r in records if r.get("image")]
    half = (root / "half.json")
    half.write_text(json.dumps(with_images[: n // 2]))
    full = (root / "full.json")
    full.write_text(json.dumps(with_images[:n]))
    model, processor = build_preset("tiny", image_size=336, patch_size=14)
    save_model(model, processor, str(root / "model"))
    return half, full


def config(root: Path, data: Path, out: str, workers: int, cpus: float):
    from llava_platform.config import PreprocessJobConfig, load_config

    return load_config(None, PreprocessJobConfig, [
        "stage=finetune", f"model.checkpoint={root / 'model'}", f"data.data_path={data}",
        f"data.image_root={root / 'synth' / 'images'}", f"output_path={out}", "overwrite=true",
        f"num_workers={workers}", f"cpus_per_worker={cpus}", "batch_size=32",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="records in the end-to-end run (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing actors (default 2: the cores here)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.75, help="logical CPUs per actor")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import ray

    from llava_platform.preprocess import prepare
    from llava_platform.ray_utils import init_ray
    from reference import prepare_reference

    root = Path(tempfile.mkdtemp(prefix="bench-pre-"))
    try:
        half, full = make_inputs(root, 2 * args.n)
        small, large = half, full  # N and 2N records
        # Warm imports and the tokenizer load path for both sides before timing anything.
        prepare_reference(config(root, small, str(root / "warm"), args.workers, args.cpus_per_worker),
                          str(root / "warm.parquet"))

        ref = {}
        for name, data in (("N", small), ("2N", large)):
            t0 = time.perf_counter()
            n, _ = prepare_reference(config(root, data, str(root / "ref"), args.workers, args.cpus_per_worker),
                                     str(root / "ref.parquet"))
            ref[name] = (n, time.perf_counter() - t0)

        temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        init_ray(num_cpus=os.cpu_count(), _temp_dir=temp)
        # Warm the cluster too (worker processes, Ray Data's first execution), so that N and 2N
        # both carry only each job's own fixed cost (id scan, actor start-up).
        prepare(config(root, small, str(root / "ray-warm"), args.workers, args.cpus_per_worker))
        ours = {}
        for name, data in (("N", small), ("2N", large)):
            t0 = time.perf_counter()
            report = prepare(config(root, data, str(root / f"ray-{name}"), args.workers, args.cpus_per_worker))
            ours[name] = (report.records_in, time.perf_counter() - t0)
            print(report.table())
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

        def rate(d, k):
            return d[k][0] / d[k][1]

        def marginal(d):
            return (d["2N"][0] - d["N"][0]) / (d["2N"][1] - d["N"][1])

        print(f"\nrecords: N = {ref['N'][0]}, 2N = {ref['2N'][0]}; {os.cpu_count()} CPU cores; {args.workers} actors")
        print(f"{'':<28}{'reference':>12}{'ray data':>12}{'ratio':>8}")
        print(f"{'end to end, N (rec/s)':<28}{rate(ref, 'N'):>12.1f}{rate(ours, 'N'):>12.1f}"
              f"{rate(ours, 'N') / rate(ref, 'N'):>8.2f}")
        print(f"{'end to end, 2N (rec/s)':<28}{rate(ref, '2N'):>12.1f}{rate(ours, '2N'):>12.1f}"
              f"{rate(ours, '2N') / rate(ref, '2N'):>8.2f}")
        print(f"{'steady state (rec/s)':<28}{marginal(ref):>12.1f}{marginal(ours):>12.1f}"
              f"{marginal(ours) / marginal(ref):>8.2f}")
        print(f"{'fixed cost (s)':<28}{ref['N'][1] - ref['N'][0] / marginal(ref):>12.1f}"
              f"{ours['N'][1] - ours['N'][0] / marginal(ours):>12.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
