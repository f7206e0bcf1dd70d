"""The web page over tav.app's jobs (tools/app.py serves it): Tune, Edit and Evaluate tabs.

Gradio is an extra (requirements-app.txt), imported when the page is built, so importing tav never needs it. Tune
and Edit share one queue of concurrency 1 (one job at a time on the device; a waiting user sees their place in
it). A bad input shows the line the CLI would print (tav.cli.error_line) in the tab's status box.
"""
import threading
import time

from tav import app
from tav.cli import error_line, is_user_error

POLL_SECONDS = 0.5
JOB_QUEUE = "tav-job"  # the one queue every job event joins
LOSS_COLUMNS = ("step", "loss")


def user_error_text(exc):
    """The CLI's one line for a bad input; anything else is a bug and is raised again (Gradio shows it)."""
    if is_user_error(exc):
        return error_line(exc)
    raise exc


def loss_frame(progress=None):
    import pandas as pd

    steps = progress.snapshot() if progress is not None else []
    return pd.DataFrame([(step, loss) for step, loss, _ in steps], columns=list(LOSS_COLUMNS))


def models_markdown(work_dir):
    models = app.list_tuned_models(work_dir)
    if not models:
        return "no tuned model yet: tune one in the Tune tab"
    return "\n".join(f"- **{m.describe()}**  \n  delta `{m.delta}`, config `{m.folder}/config.yaml`" for m in models)


def model_names(work_dir):
    return [m.name for m in app.list_tuned_models(work_dir)]


def build_app(work_dir, scorers=None):
    """The gr.Blocks of the app over `work_dir` (tav.app's layout); `scorers` (tav.evaluation.Scorers) enable the
    scores of each edit."""
    import gradio as gr

    def tune(upload, use_bundled, prompt, base, frames, stride, size, steps, learning_rate, seed):
        video = app.BUNDLED_CLIP if use_bundled or not upload else upload
        progress = app.JobProgress()
        keep = gr.update()
        try:
            config = app.tune_config(app.TuneSettings(video, prompt, base, int(frames), int(stride), 0, int(size),
                                                      int(steps), float(learning_rate), int(seed)), work_dir)
        except Exception as exc:  # noqa: BLE001 - a user error is shown, a bug raised again
            yield user_error_text(exc), loss_frame(), keep, keep, progress
            return
        outcome = {}

        def work():
            try:
                outcome["result"] = app.run_tune(config, progress)
            except Exception as exc:  # noqa: BLE001 - reported below, in the page
                outcome["error"] = exc

        thread = threading.Thread(target=work, name="tav-tune", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                yield progress.summary(), loss_frame(progress), keep, keep, progress
                thread.join(POLL_SECONDS)
        finally:  # the page went away: stop the run, so the queue's one slot really is free
            if thread.is_alive():
                progress.cancel()
                thread.join()
        error = outcome.get("error")
        if isinstance(error, app.JobCancelled):
            text = f"cancelled: {error}; nothing was kept"
        elif error is not None:
            text = user_error_text(error)
        else:
            text = f"done: {progress.summary()}; model {config.output_dir}"
        names = model_names(work_dir)
        yield (text, loss_frame(progress), models_markdown(work_dir),
               gr.update(choices=names, value=names[0] if names and error is None else None), progress)

    def cancel(progress):
        if progress is None or progress.state in ("done", "cancelled"):
            return "nothing to cancel"
        progress.cancel()
        return "cancelling after the current step..."

    def edit(model, prompts, negative_prompt, guidance, steps, seed, window, window_overlap):
        started = time.time()
        try:
            request = app.edit_request(app.EditSettings(
                model or "", app.split_prompts(prompts), negative_prompt, float(guidance), int(steps), int(seed),
                int(window) if window else None, int(window_overlap) if window and window_overlap else None),
                work_dir)
        except Exception as exc:  # noqa: BLE001
            yield user_error_text(exc), [], [], []
            return
        progress, outcome, keep = app.JobProgress(), {}, gr.update()

        def work():
            try:
                outcome["outputs"] = app.run_edit(request, scorers, progress)
            except Exception as exc:  # noqa: BLE001 - reported below, in the page
                outcome["error"] = exc

        thread = threading.Thread(target=work, name="tav-edit", daemon=True)
        thread.start()
        while thread.is_alive():  # the phase and DDIM step, as the tune tab shows its steps
            yield f"{progress.summary()} ({time.time() - started:.0f} s)", keep, keep, keep
            thread.join(POLL_SECONDS)
        if "error" in outcome:
            yield user_error_text(outcome["error"]), [], [], []
            return
        outputs = outcome["outputs"]
        text = f"done: {len(outputs)} edit(s) in {time.time() - started:.0f} s, in {request.output_dir}"
        if scorers:
            text += "\n\n" + app.scores_table(outputs)
        yield (text, [(o.mp4, o.prompt) for o in outputs], [(o.grid, o.prompt) for o in outputs],
               [path for o in outputs for path in (o.mp4, o.gif, o.frames_zip)])

    def evaluate(model):
        try:
            outputs = app.evaluate_edits(model or "", work_dir, scorers)
        except Exception as exc:  # noqa: BLE001
            return user_error_text(exc), []
        return app.scores_table(outputs), [(o.grid, o.prompt) for o in outputs]

    def refresh():
        names = model_names(work_dir)
        choice = gr.update(choices=names, value=names[0] if names else None)
        return models_markdown(work_dir), choice, choice

    bases = app.base_model_choices()
    with gr.Blocks(title="tav: Tune-A-Video", analytics_enabled=False) as page:
        gr.Markdown("# tav: Tune-A-Video\nTune the model on one clip, then edit the clip with new prompts "
                    "(DDIM inversion of the clip, sampled with the tuned model).")
        progress_state = gr.State(None)
        with gr.Tab("Tune", elem_id="tab_tune"):
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="clip (mp4, gif, ...)", type="filepath", elem_id="tune_upload")
                    use_bundled = gr.Checkbox(label=f"use the bundled clip ({app.BUNDLED_CLIP})", value=False,
                                              elem_id="tune_bundled")
                    prompt = gr.Textbox(label="caption of the clip", value=app.BUNDLED_PROMPT, elem_id="tune_prompt")
                    base = gr.Dropdown(bases, value=bases[0], allow_custom_value=True, elem_id="tune_base",
                                       label="base model (an embedded one, a diffusers folder or one checkpoint "
                                             "file)")
                    with gr.Row():
                        frames = gr.Number(8, label="frames", precision=0, elem_id="tune_frames")
                        stride = gr.Number(1, label="stride", precision=0, elem_id="tune_stride")
                        size = gr.Number(64, label="size (pixels, multiple of 8)", precision=0, elem_id="tune_size")
                    with gr.Row():
                        steps = gr.Number(60, label="steps", precision=0, elem_id="tune_steps")
                        learning_rate = gr.Number(3e-4, label="learning rate", elem_id="tune_lr")
                        seed = gr.Number(33, label="seed", precision=0, elem_id="tune_seed")
                    with gr.Row():
                        tune_button = gr.Button("Tune", variant="primary", elem_id="tune_button")
                        cancel_button = gr.Button("Cancel", elem_id="tune_cancel")
                with gr.Column():
                    tune_status = gr.Textbox(label="progress", interactive=False, elem_id="tune_status")
                    loss_plot = gr.LinePlot(loss_frame(), x="step", y="loss", title="loss", elem_id="tune_loss")
                    models = gr.Markdown(models_markdown(work_dir), elem_id="tune_models")
        with gr.Tab("Edit", elem_id="tab_edit"):
            with gr.Row():
                with gr.Column():
                    edit_model = gr.Dropdown(model_names(work_dir), label="tuned model", elem_id="edit_model")
                    prompts = gr.Textbox(label="prompts, one per line", lines=3, elem_id="edit_prompts",
                                         value="a blue square on a white background\n"
                                               "a red circle on a white background")
                    negative_prompt = gr.Textbox(label="negative prompt", elem_id="edit_negative")
                    with gr.Row():
                        guidance = gr.Number(7.5, label="guidance scale", elem_id="edit_guidance")
                        edit_steps = gr.Number(25, label="steps (inversion and sampling)", precision=0,
                                               elem_id="edit_steps")
                        edit_seed = gr.Number(33, label="seed", precision=0, elem_id="edit_seed")
                    with gr.Row():
                        window = gr.Number(0, label="window (frames per UNet call; 0: all)", precision=0,
                                           elem_id="edit_window")
                        window_overlap = gr.Number(0, label="window overlap (0: window // 3)", precision=0,
                                                   elem_id="edit_overlap")
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit_button")
                with gr.Column():
                    edit_status = gr.Markdown(elem_id="edit_status")
                    videos = gr.Gallery(label="edits", elem_id="edit_videos", columns=2)
                    grids = gr.Gallery(label="source | edit", elem_id="edit_grids", columns=1)
                    downloads = gr.File(label="downloads (mp4, gif, frames zip)", file_count="multiple",
                                        interactive=False, elem_id="edit_downloads")
        with gr.Tab("Evaluate", elem_id="tab_evaluate"):
            gr.Markdown("Scores of each edit (frame consistency and text alignment with CLIP, PickScore)."
                        + ("" if scorers else " No scoring model is configured: start the app with "
                           "--eval_clip_model and/or --eval_pickscore_model."))
            eval_model = gr.Dropdown(model_names(work_dir), label="tuned model", elem_id="eval_model")
            eval_button = gr.Button("Score its edits", elem_id="eval_button")
            eval_table = gr.Markdown(elem_id="eval_table")
            eval_grids = gr.Gallery(label="source | edit", columns=1, elem_id="eval_grids")

        tune_button.click(tune, [upload, use_bundled, prompt, base, frames, stride, size, steps, learning_rate,
                                 seed], [tune_status, loss_plot, models, edit_model, progress_state],
                          concurrency_id=JOB_QUEUE, concurrency_limit=1)
        cancel_button.click(cancel, [progress_state], [tune_status], queue=False)
        edit_button.click(edit, [edit_model, prompts, negative_prompt, guidance, edit_steps, edit_seed, window,
                                 window_overlap], [edit_status, videos, grids, downloads],
                          concurrency_id=JOB_QUEUE, concurrency_limit=1)
        eval_button.click(evaluate, [eval_model], [eval_table, eval_grids], concurrency_id=JOB_QUEUE,
                          concurrency_limit=1)
        page.load(refresh, None, [models, edit_model, eval_model], queue=False)
    page.queue(default_concurrency_limit=1)
    return page
