"""``python -m flowar.app RELEASE_DIR [RELEASE_DIR ...] [--host 127.0.0.1] [--port N] [--compile]``.

Serves the page on http://HOST:PORT; every folder is loaded before the server starts, and a folder that is
not a release stops it with a message naming the folder.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .releases import Releases, RequestError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowar.app", description="Serve the flowar web demo over release "
                                "folders (config.json + model.safetensors with vae/ or tokenizer/).")
    p.add_argument("releases", nargs="+", metavar="RELEASE_DIR", help="FlowAR, VAR, FlexVAR or xAR release folders")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 shares it on the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run the generators under bf16 autocast")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generators' hot spots (the first request of each size compiles)")
    p.add_argument("--no-loader", action="store_true",
                   help="hide the box that loads more folders from the server's disk (for a shared server)")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs the internet)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if not 0 <= args.port <= 65535:
        print(f"flowar.app: --port must be 0-65535, got {args.port}", file=sys.stderr)
        return 2
    releases = Releases(device=args.device, autocast_dtype=torch.bfloat16 if args.bf16 else None,
                        compile=args.compile)
    try:
        for path in args.releases:
            release = releases.load(path)
            print(f"loaded {release.describe()}", flush=True)
    except RequestError as err:
        print(f"flowar.app: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unasked
    import gradio as gr

    from .page import build_page

    page = build_page(releases, loader=not args.no_loader)
    # System fonts: the default theme fetches Google Fonts, which an offline browser waits for in vain.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    page.queue(default_concurrency_limit=None)  # each model's lock is its queue; the models run side by side
    port = args.port or None
    page.launch(server_name=args.host, server_port=port, share=args.share, theme=theme, show_error=True,
                ssr_mode=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
