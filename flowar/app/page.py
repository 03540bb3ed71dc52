"""The web demo's page (Gradio): Generate, Edit and Compare tabs over the releases a server holds.

Every handler turns a bad input into a message in its tab's status line and leaves the server serving; the
models' own checks give the wording. Each tab's Stop button sets the page session's cancel flag, which the
engine's per-scale hook reads, so a stopped request frees its model at the next scale.
"""

from __future__ import annotations

import tempfile
import threading
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from .releases import Cancelled, Release, Releases, RequestError, Result, check_image, fit_image, outpaint_region

DISPLAY_SIDE = 128  # pixels an image is at least shown at
TASKS = {"regenerate the painted region": "inpaint", "outpaint: keep a centred square": "outpaint"}


class Sessions:
    """One cancel flag per page session and tab: a Stop in one browser tab stops only that tab's request."""

    def __init__(self):
        self.flags: dict[tuple[str, str], threading.Event] = {}
        self.lock = threading.Lock()

    def start(self, request: gr.Request, tab: str) -> threading.Event:
        with self.lock:
            flag = self.flags[(request.session_hash, tab)] = threading.Event()
        return flag

    def stopper(self, tab: str):
        """The Stop button's handler for ``tab``."""

        def stop(request: gr.Request) -> None:
            with self.lock:
                flag = self.flags.get((request.session_hash, tab))
            if flag is not None:
                flag.set()

        return stop


class Outputs:
    """Where a request's grid and zip of PNGs are written for the page to serve (removed when the server stops)."""

    def __init__(self):
        self.folder = tempfile.TemporaryDirectory(prefix="flowar-app-")

    def write(self, result: Result, stem: str) -> tuple[str, str]:
        folder = Path(self.folder.name) / uuid.uuid4().hex
        folder.mkdir()
        grid, archive = folder / f"{stem}.png", folder / f"{stem}.zip"
        picture = result.grid()
        # Small images (the digits) are shown enlarged by a whole factor, nearest neighbour, so pixels stay
        # pixels; the zip holds them at their own size.
        factor = max(1, DISPLAY_SIDE // result.images.shape[1])
        picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST).save(grid)
        archive.write_bytes(result.zip_bytes(stem))
        return str(grid), str(archive)


def timing(result: Result, release: Release) -> str:
    n = len(result.images)
    precision = "bf16" if release.autocast_dtype is not None else "fp32"
    first = result.settings[0]
    label = "" if first["class_id"] is None else f" of class {first['class_id']}"
    return (f"{n} image{'s' if n > 1 else ''}{label}, seed {first['seed']}, from {release.name} in "
            f"{result.sampling_seconds + result.decoding_seconds:.2f} s: {result.ms_per_image:.1f} ms/image "
            f"(sampling {1000 * result.sampling_seconds / n:.1f}, decoding {1000 * result.decoding_seconds / n:.1f}; "
            f"{release.pipeline.device.type}, {precision})")


def error(message) -> str:
    return f"**Error:** {message}"


def control_updates(release: Release, *, with_null: bool = False) -> list:
    """Class choices, defaults and the family's controls shown for ``release``: class, guidance, steps,
    solver (its family's choices), top-k, top-p."""
    d = release.defaults
    choices = release.class_choices(with_null=with_null)
    flow = bool(release.solvers)  # FlowAR and xAR take steps and a solver, VAR and FlexVAR top-k and top-p
    steps = d.steps if flow else None
    steps_text = "" if steps is None else (",".join(map(str, steps)) if isinstance(steps, tuple) else str(steps))
    first = next((value for _, value in choices if value >= 0), None)
    return [
        gr.update(choices=choices, value=first, visible=bool(choices)),
        gr.update(value=d.guidance_scale, interactive=release.num_classes > 0),
        gr.update(value=steps_text, visible=flow),
        gr.update(choices=list(release.solvers), value=d.solver if flow else None, visible=flow),
        gr.update(value=getattr(d, "top_k", 0), visible=not flow),
        gr.update(value=getattr(d, "top_p", 0.0), visible=not flow),
    ]


def scales_update(release: Release):
    """The Generate tab's scale list: empty (the release's own), shown where the release samples any list."""
    return gr.update(value="", visible=release.samples_any_scales)


def build_page(releases: Releases, *, loader: bool = True) -> gr.Blocks:
    """The page over ``releases`` (at least one loaded). loader: a box to load more release folders."""
    sessions, outputs = Sessions(), Outputs()
    first = releases[releases.names[0]]

    def model_dropdown(elem_id: str, label: str = "model", value=None):
        return gr.Dropdown(releases.names, value=value or first.name, label=label, elem_id=elem_id)

    def sampling_controls(prefix: str, release: Release, with_null: bool = False):
        class_, guidance, steps, solver, top_k, top_p = control_updates(release, with_null=with_null)
        return [
            gr.Dropdown(label="class", elem_id=f"{prefix}-class", **_kwargs(class_)),
            gr.Slider(1, 20, step=0.05, label="guidance scale (1 = unguided)", elem_id=f"{prefix}-guidance",
                      **_kwargs(guidance)),
            gr.Textbox(label="steps per scale, xAR: per cell (one count, or one per scale: 20,20,20,10)",
                       elem_id=f"{prefix}-steps", **_kwargs(steps)),
            gr.Dropdown(label="solver", elem_id=f"{prefix}-solver", **_kwargs(solver)),
            gr.Number(label="top-k (0 = off)", precision=0, minimum=0, elem_id=f"{prefix}-top-k", **_kwargs(top_k)),
            gr.Slider(0, 1, step=0.01, label="top-p (0 = off)", elem_id=f"{prefix}-top-p", **_kwargs(top_p)),
        ]

    def answer(run):
        """A request's status line, grid and zip; a bad input or a Stop gives a message and keeps the outputs."""
        try:
            release, result, stem = run()
        except RequestError as err:
            return error(err), gr.skip(), gr.skip()
        except Cancelled as stop:
            return f"Stopped ({stop}).", gr.skip(), gr.skip()
        grid, archive = outputs.write(result, stem)
        return timing(result, release), grid, archive

    def seed_and_buttons(prefix: str, action: str):
        seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id=f"{prefix}-seed")
        with gr.Row():
            go = gr.Button(action, variant="primary", elem_id=f"{prefix}-go")
            stop = gr.Button("Stop", elem_id=f"{prefix}-stop")
        return seed, go, stop

    with gr.Blocks(title="flowar", analytics_enabled=False) as page:
        gr.Markdown("## flowar: scale-wise image generation\nSample, edit and compare the releases this server "
                    "holds. One request at a time runs on each model; the others wait in its queue.")
        described = gr.Markdown("\n".join(f"- {releases[n].describe()}" for n in releases.names), elem_id="models")

        with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    g_model = model_dropdown("gen-model")
                    g_class, g_guidance, g_steps, g_solver, g_top_k, g_top_p = sampling_controls("gen", first)
                    g_scales = gr.Textbox(label="scales: the sides to sample, e.g. 1,2,4,8,12 for larger images, "
                                                "1,2,4,8x12 for wider ones "
                                                "(empty: the model's own)", elem_id="gen-scales",
                                          **_kwargs(scales_update(first)))
                    g_count = gr.Slider(1, 64, value=8, step=1, label="number of images", elem_id="gen-count")
                    g_seed, g_go, g_stop = seed_and_buttons("gen", "Generate")
                with gr.Column(scale=2):
                    g_status = gr.Markdown(elem_id="gen-status")
                    g_grid = gr.Image(label="grid", type="filepath", interactive=False, elem_id="gen-grid")
                    g_files = gr.File(label="the PNGs, settings in their metadata (zip)", elem_id="gen-files")

        with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
            with gr.Row():
                with gr.Column(scale=1):
                    e_model = model_dropdown("edit-model")
                    e_class, e_guidance, e_steps, e_solver, e_top_k, e_top_p = sampling_controls("edit", first, True)
                    e_task = gr.Radio(list(TASKS), value=next(iter(TASKS)), label="edit", elem_id="edit-task")
                    e_kept = gr.Slider(0.1, 0.95, value=0.5, step=0.05, label="kept centre (share of the side)",
                                       elem_id="edit-kept")
                    e_fit = gr.Checkbox(False, label="fit to the model's size (crop the centre and resize)",
                                        elem_id="edit-fit")
                    e_count = gr.Slider(1, 16, value=4, step=1, label="number of variants", elem_id="edit-count")
                    e_seed, e_go, e_stop = seed_and_buttons("edit", "Edit")
                with gr.Column(scale=2):
                    e_upload = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                        label="1. upload an image", elem_id="edit-upload")
                    e_canvas = gr.ImageEditor(type="numpy", image_mode="RGBA", sources=(), transforms=(),
                                              layers=False, label="2. paint the region to regenerate",
                                              brush=brush(first.side),
                                              elem_id="edit-canvas")
                    e_image = gr.State(None)  # the checked upload, (side, side, 3) uint8
                    e_status = gr.Markdown(elem_id="edit-status")
                    e_grid = gr.Image(label="edits", type="filepath", interactive=False, elem_id="edit-grid")
                    e_files = gr.File(label="the PNGs, settings in their metadata (zip)", elem_id="edit-files")

        with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
            with gr.Row():
                c_model_a = model_dropdown("compare-a", "model A")
                c_model_b = model_dropdown("compare-b", "model B", releases.names[-1])
            with gr.Row():
                c_class = gr.Dropdown(label="class", elem_id="compare-class",
                                      **_kwargs(control_updates(first)[0]))
                c_count = gr.Slider(1, 64, value=8, step=1, label="number of images", elem_id="compare-count")
                c_seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="compare-seed")
            gr.Markdown("Each model samples with its release's own saved settings, from the same seed and class.")
            with gr.Row():
                c_go = gr.Button("Compare", variant="primary", elem_id="compare-go")
                c_stop = gr.Button("Stop", elem_id="compare-stop")
            c_status = gr.Markdown(elem_id="compare-status")
            with gr.Row():
                c_grid_a = gr.Image(label="model A", type="filepath", interactive=False, elem_id="compare-grid-a")
                c_grid_b = gr.Image(label="model B", type="filepath", interactive=False, elem_id="compare-grid-b")

        model_dropdowns = [g_model, e_model, c_model_a, c_model_b]
        if loader:
            with gr.Accordion("Load another release folder", open=False, elem_id="loader"):
                with gr.Row():
                    l_path = gr.Textbox(label="release folder on this server", elem_id="load-path")
                    l_go = gr.Button("Load", elem_id="load-go")
                l_status = gr.Markdown(elem_id="load-status")

            def load(path):
                try:
                    release = releases.load(str(path).strip())
                except RequestError as err:
                    return [error(err), gr.skip()] + [gr.skip()] * len(model_dropdowns)
                listed = "\n".join(f"- {releases[n].describe()}" for n in releases.names)
                return [f"Loaded {release.describe()}", listed] + [gr.update(choices=releases.names)] * len(model_dropdowns)

            l_go.click(load, [l_path], [l_status, described, *model_dropdowns], api_name="load")

        # ---------------------------------------------------------------------------------- Generate
        g_controls = [g_class, g_guidance, g_steps, g_solver, g_top_k, g_top_p, g_scales]
        g_model.change(lambda name: [*control_updates(releases[name]), scales_update(releases[name])], [g_model],
                       g_controls, api_name=False)

        def generate(name, class_, guidance, steps, solver, top_k, top_p, scales, count, seed, request: gr.Request,
                     progress=gr.Progress()):
            cancel = sessions.start(request, "generate")

            def run():
                release = releases[name]
                options = release.sampling(guidance_scale=guidance, steps=steps, solver=solver, top_k=top_k,
                                           top_p=top_p, scales=scales)
                result = release.generate(class_, count, seed, options, cancel=cancel,
                                          progress=lambda f, text: progress(f, desc=text))
                return release, result, f"{release.name}-seed{seed}"

            return answer(run)

        g_event = g_go.click(generate, [g_model, *g_controls, g_count, g_seed], [g_status, g_grid, g_files],
                             api_name="generate")
        g_stop.click(sessions.stopper("generate"), None, None, cancels=[g_event], api_name=False)

        # ---------------------------------------------------------------------------------- Edit
        e_controls = [e_class, e_guidance, e_steps, e_solver, e_top_k, e_top_p]
        e_model.change(lambda name: control_updates(releases[name], with_null=True), [e_model], e_controls,
                       api_name=False)

        def upload(path, name, fit):
            """Check the uploaded file as it is (size, mode) and show it on the canvas to paint on."""
            if path is None:
                return None, None, ""
            try:
                release = releases[name]
                with Image.open(path) as opened:
                    image = opened.copy()
                if fit:
                    image = fit_image(image, release.side)
                pixels = check_image(image, release.side, release.name)
            except RequestError as err:
                return None, None, error(err)
            except OSError as err:
                return None, None, error(f"the upload is not an image this server can read ({err})")
            canvas = gr.update(value={"background": pixels, "layers": [], "composite": pixels}, brush=brush(release.side))
            return pixels, canvas, f"{release.side}x{release.side} image ready: paint the region to regenerate."

        e_upload.change(upload, [e_upload, e_model, e_fit], [e_image, e_canvas, e_status], api_name=False)
        e_fit.change(upload, [e_upload, e_model, e_fit], [e_image, e_canvas, e_status], api_name=False)

        def edit(name, class_, guidance, steps, solver, top_k, top_p, task, kept, canvas, image, count, seed,
                 request: gr.Request, progress=gr.Progress()):
            cancel = sessions.start(request, "edit")

            def run():
                release = releases[name]
                if image is None:
                    raise RequestError("upload an image to edit first")
                if image.shape[0] != release.side:
                    raise RequestError(f"the uploaded image is {image.shape[0]}x{image.shape[0]}; {release.name} "
                                       f"edits {release.side}x{release.side}: upload it again for this model")
                mode = TASKS.get(task)
                if mode is None:
                    raise RequestError(f"edit must be one of {list(TASKS)}, got {task!r}")
                region = painted_region(canvas, release.side) if mode == "inpaint" else outpaint_region(release.side, kept)
                options = release.sampling(guidance_scale=guidance, steps=steps, solver=solver, top_k=top_k,
                                           top_p=top_p)
                result = release.edit(Image.fromarray(image), region, class_, count, seed, options, task=mode,
                                      cancel=cancel, progress=lambda f, text: progress(f, desc=text))
                return release, result, f"{release.name}-{mode}-seed{seed}"

            return answer(run)

        e_event = e_go.click(edit, [e_model, *e_controls, e_task, e_kept, e_canvas, e_image, e_count, e_seed],
                             [e_status, e_grid, e_files], api_name="edit")
        e_stop.click(sessions.stopper("edit"), None, None, cancels=[e_event], api_name=False)

        # ---------------------------------------------------------------------------------- Compare
        c_model_a.change(lambda name: control_updates(releases[name])[0], [c_model_a], [c_class], api_name=False)

        def compare(name_a, name_b, class_, count, seed, request: gr.Request, progress=gr.Progress()):
            cancel = sessions.start(request, "compare")
            try:
                a, b = releases[name_a], releases[name_b]
                if a.num_classes != b.num_classes:
                    raise RequestError(f"{a.name} has {a.num_classes} classes and {b.name} {b.num_classes}: "
                                       "compare models of the same classes")
                results = []
                for i, release in enumerate((a, b)):
                    report = (lambda f, text, i=i, r=release: progress((i + f) / 2, desc=f"{r.name}: {text}"))
                    results.append(release.generate(class_, count, seed, release.defaults, cancel=cancel,
                                                    progress=report))
            except RequestError as err:
                return error(err), gr.skip(), gr.skip()
            except Cancelled as stop:
                return f"Stopped ({stop}).", gr.skip(), gr.skip()
            grids = [outputs.write(r, f"{rel.name}-seed{seed}")[0] for r, rel in zip(results, (a, b))]
            lines = "\n".join(f"- {timing(r, rel)}" for r, rel in zip(results, (a, b)))
            return f"Same seed ({seed}) and class:\n{lines}", *grids

        c_event = c_go.click(compare, [c_model_a, c_model_b, c_class, c_count, c_seed],
                             [c_status, c_grid_a, c_grid_b], api_name="compare")
        c_stop.click(sessions.stopper("compare"), None, None, cancels=[c_event], api_name=False)
    page.outputs = outputs  # kept alive with the page: the files it serves
    return page


def brush(side: int) -> gr.Brush:
    """One colour; a width of an eighth of the image, whatever its size (the default is wider than a digit)."""
    return gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=max(1, side // 8))


def painted_region(canvas, side: int) -> np.ndarray:
    """(side, side) bool: True where the user painted on the editor's layers."""
    if not isinstance(canvas, dict) or not canvas.get("layers"):
        raise RequestError("paint the region to regenerate on the image (or choose outpainting)")
    painted = np.zeros((side, side), dtype=bool)
    for layer in canvas["layers"]:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[-1] != 4:
            continue
        alpha = layer[..., 3]
        if alpha.shape != (side, side):
            alpha = np.asarray(Image.fromarray(alpha).resize((side, side), Image.Resampling.BOX))
        painted |= alpha > 127
    return painted


def _kwargs(update: dict) -> dict:
    """A ``gr.update`` dict as constructor keywords."""
    return {k: v for k, v in update.items() if k != "__type__"}
