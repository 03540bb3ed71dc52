"""The web demo's Generate against the library's own sampling and decoding, side by side on one machine.

    python -m tools.bench_app runs/demo/flowar-release --count 10 --repeats 5

First the library in this process: ``pipe(labels, output_type="sample")`` and ``decode_output`` timed apart.
Then ``python -m flowar.app`` on 127.0.0.1 and the same request through its Generate endpoint
(``gradio_client``), timed from the request to the files being ready: sampling, decoding, PNGs, the zip and
HTTP. Both use the release's saved sampling defaults, one class, one seed; medians after one warm-up each.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import torch

from eval.machine import device_label
from flowar.outputs import decode_output
from flowar.registry import load_pipeline


def library_times(path, label: int, count: int, seed: int, repeats: int) -> tuple[float, float]:
    """Median seconds of sampling and of decoding ``count`` images with the library."""
    pipe = load_pipeline(path)
    sampling, decoding = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        sample = pipe([label] * count, generator=torch.Generator().manual_seed(seed), output_type="sample")
        sampled = time.perf_counter()
        decode_output(pipe.autoencoder, sample, "np")
        sampling.append(sampled - start)
        decoding.append(time.perf_counter() - sampled)
    return statistics.median(sampling[1:]), statistics.median(decoding[1:])


def start_app(releases) -> tuple[subprocess.Popen, str]:
    """``python -m flowar.app RELEASES`` on a free port of 127.0.0.1, once its page answers: (process, url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "flowar.app", *map(str, releases), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(480):
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return server, url
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"python -m flowar.app {' '.join(map(str, releases))} did not start")


def app_times(path, label: int, count: int, seed: int, repeats: int) -> tuple[float, str]:
    """Median seconds of a Generate request to the demo's server, and the server's last timing line."""
    from gradio_client import Client

    d = load_pipeline(path).model.sampling_options()  # the release's defaults, as the page starts with them
    steps = "" if d.steps is None else ",".join(map(str, d.steps)) if isinstance(d.steps, tuple) else str(d.steps)
    controls = (d.guidance_scale, steps, getattr(d, "solver", None), getattr(d, "top_k", 0), getattr(d, "top_p", 0.0),
                "")  # the scale list: the release's own
    server, url = start_app([path])
    try:
        client = Client(url, verbose=False)
        name = str(path).rstrip("/").split("/")[-1]
        walls, line = [], ""
        for _ in range(repeats + 1):
            start = time.perf_counter()
            line, _, _ = client.predict(name, label, *controls, count, seed, api_name="/generate")
            walls.append(time.perf_counter() - start)
            if not re.search(r"ms/image", line):
                raise RuntimeError(f"the demo refused the request: {line}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return statistics.median(walls[1:]), line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("release")
    p.add_argument("--label", type=int, default=7)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(f"{device_label(torch.device('cpu'))}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    sampling, decoding = library_times(args.release, args.label, args.count, args.seed, args.repeats)
    wall, line = app_times(args.release, args.label, args.count, args.seed, args.repeats)
    library = sampling + decoding
    print(f"library: sampling {1000 * sampling:.0f} ms + decoding {1000 * decoding:.0f} ms = {1000 * library:.0f} ms "
          f"for {args.count} images")
    print(f"web demo Generate, request to files: {1000 * wall:.0f} ms ({wall / library:.2f}x the library)")
    print(f"the page's own timing line: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
