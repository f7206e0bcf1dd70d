"""tav.video: reading clips the official way, writing results atomically."""
import os
import stat
from pathlib import Path

import cv2
import imageio.v2
import imageio.v3
import numpy as np
import pytest
from PIL import Image

from tav import video
from tav.tiny import make_demo_clip
from tests.helpers import REPO_ROOT, SHARED_DATA
from tav.video import (VideoError, check_writable_dir, frames_to_pixel_values, load_video, make_grid_frames,
                       read_video_frames, save_videos_grid, video_to_uint8, write_video)



def real_clip(name):
    """One of the official clips (beside the repository, never in it). The tests using them check decoding against
    real footage and ask for the `shared_data` fixture, so they are deselected where the clips are absent; every
    other test here runs on generated clips."""
    path = SHARED_DATA / name
    assert path.is_file(), f"{path} is missing from the official clips in {SHARED_DATA}"
    return path


def official_train_data(name):
    """train_data of the official YAML config (the copy shipped in configs/)."""
    from omegaconf import OmegaConf
    return OmegaConf.load(REPO_ROOT / "configs" / f"{name}.yaml").train_data


def decode_with_cv2(path, n_frames):
    """Independent reference: OpenCV, native size, consecutive frames 0 .. n_frames-1, RGB."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    for _ in range(n_frames):
        ok, bgr = cap.read()
        assert ok
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


@pytest.fixture(scope="module")
def skiing_official(shared_data):
    cfg = official_train_data("man-skiing")
    assert (cfg.n_sample_frames, cfg.sample_start_idx, cfg.sample_frame_rate) == (24, 0, 2)
    return read_video_frames(real_clip("man-skiing.mp4"), cfg.n_sample_frames, cfg.sample_start_idx,
                             cfg.sample_frame_rate, cfg.height, cfg.width)


@pytest.fixture(scope="module")
def skiing_consecutive(shared_data):
    return read_video_frames(real_clip("man-skiing.mp4"), 47, 0, 1, 512, 512)


@pytest.fixture
def demo_mp4(tmp_path):
    return make_demo_clip(tmp_path / "demo.mp4", n_frames=16, height=64, width=64)


# ---------------------------------------------------------------------------------------------- real clips
def test_man_skiing_official_config_gives_24_frames_of_512(skiing_official):
    assert skiing_official.shape == (24, 512, 512, 3)
    assert skiing_official.dtype == np.uint8


def test_stride_2_selects_every_second_decoded_frame(skiing_official, skiing_consecutive):
    np.testing.assert_array_equal(skiing_official, skiing_consecutive[0:47:2])
    # a wrong stride would be caught: the first 24 consecutive frames are a different clip
    assert not np.array_equal(skiing_official, skiing_consecutive[:24])


def test_selected_frames_match_an_independent_opencv_decode_at_the_same_indices(skiing_official):
    reference = [cv2.resize(f, (512, 512), interpolation=cv2.INTER_AREA).astype(np.int16)
                 for f in decode_with_cv2(real_clip("man-skiing.mp4"), 48)]
    for k, frame in enumerate(skiing_official):
        index = 2 * k
        candidates = range(max(0, index - 2), min(len(reference), index + 3))
        diffs = {j: np.abs(frame.astype(np.int16) - reference[j]).mean() for j in candidates}
        # same frame: only decoder colour-matrix and scaler differences (about 2 levels); neighbours differ >= 5
        assert min(diffs, key=diffs.get) == index, (k, diffs)
        assert diffs[index] < 3.5, (k, diffs)


def test_default_backend_is_decords_ffmpeg_graph_with_bilinear_scaling(skiing_official):
    # decord 0.6.0's graph: scale=W:H with the (FFmpeg 4.x) filter default flags=bilinear, output rgb24
    import subprocess
    import imageio_ffmpeg
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(real_clip("man-skiing.mp4")),
           "-frames:v", "1", "-vf", "scale=512:512:flags=bilinear", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    frame0 = np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.uint8)
    np.testing.assert_array_equal(skiing_official[0], frame0.reshape(512, 512, 3))
    bicubic = read_video_frames(real_clip("man-skiing.mp4"), 1, scale_flags="bicubic")
    assert not np.array_equal(bicubic[0], skiing_official[0])


def test_man_surfing_official_config_is_the_first_24_frames(shared_data):
    cfg = official_train_data("man-surfing")
    assert (cfg.n_sample_frames, cfg.sample_frame_rate) == (24, 1)
    path = real_clip("man-surfing.mp4")
    frames = read_video_frames(path, cfg.n_sample_frames, cfg.sample_start_idx, cfg.sample_frame_rate,
                               cfg.height, cfg.width, resize_backend="opencv")
    assert frames.shape == (24, 512, 512, 3) and frames.dtype == np.uint8
    # the OpenCV backend is exactly "decode with cv2, resize with INTER_AREA" at indices 0..23
    expected = [cv2.resize(f, (512, 512), interpolation=cv2.INTER_AREA) for f in decode_with_cv2(path, 24)]
    np.testing.assert_array_equal(frames, np.stack(expected))


def test_start_index_offsets_the_strided_selection(skiing_consecutive):
    frames = read_video_frames(real_clip("man-skiing.mp4"), 4, sample_start_idx=10, sample_frame_rate=3)
    np.testing.assert_array_equal(frames, skiing_consecutive[10:22:3])


def test_stride_and_start_select_the_official_indices_of_a_generated_clip(tmp_path):
    clip = make_demo_clip(tmp_path / "frames.png", n_frames=16, height=32, width=32, seed=5)  # lossless
    every = read_video_frames(clip, 16, 0, 1, 32, 32)
    assert not any(np.array_equal(every[i], every[i + 1]) for i in range(15))  # each frame tells its index
    np.testing.assert_array_equal(read_video_frames(clip, 8, 0, 2, 32, 32), every[0:16:2])
    np.testing.assert_array_equal(read_video_frames(clip, 4, 3, 3, 32, 32), every[3:15:3])


# ---------------------------------------------------------------------------------------------- pixel values
def test_pixel_scaling_is_exact():
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    frames[0] = 255
    frames[1, :, :, 0] = 128
    pixels = frames_to_pixel_values(frames)
    assert pixels.dtype == np.float32 and pixels.shape == (2, 3, 8, 8)
    assert np.all(pixels[0] == 1.0)
    assert np.all(pixels[1, 1:] == -1.0)
    assert np.all(pixels[1, 0] == np.float32(128) / np.float32(127.5) - np.float32(1))


def test_load_video_is_read_then_scaled(demo_mp4):
    pixels = load_video(demo_mp4, 8, sample_frame_rate=2, height=64, width=32)
    frames = read_video_frames(demo_mp4, 8, sample_frame_rate=2, height=64, width=32)
    assert pixels.shape == (8, 3, 64, 32)
    np.testing.assert_array_equal(pixels, frames_to_pixel_values(frames))


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_file_raises(tmp_path):
    with pytest.raises(VideoError, match=r"nope\.mp4.*not found"):
        read_video_frames(tmp_path / "nope.mp4", 8)


@pytest.mark.parametrize("backend", ["ffmpeg", "opencv"])
def test_text_file_renamed_mp4_is_unreadable(tmp_path, backend):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 20)
    with pytest.raises(VideoError, match=r"notes\.mp4.*unreadable"):
        read_video_frames(fake, 8, height=64, width=64, resize_backend=backend)


@pytest.mark.parametrize("backend", ["ffmpeg", "opencv"])
def test_too_few_frames_names_the_counts(demo_mp4, backend):
    with pytest.raises(VideoError) as info:
        read_video_frames(demo_mp4, 10, sample_start_idx=0, sample_frame_rate=2, height=64, width=64,
                          resize_backend=backend)
    message = str(info.value)
    assert "demo.mp4 has 16 frames" in message
    assert "sample_start_idx=0, sample_frame_rate=2 give only 8 of the n_sample_frames=10 requested" in message


@pytest.mark.parametrize("kwargs, words", [
    (dict(height=500), "height must be a positive multiple of 8, got 500"),
    (dict(width=0), "width must be a positive multiple of 8, got 0"),
    (dict(n_sample_frames=0), "n_sample_frames must be an integer >= 1"),
    (dict(sample_frame_rate=0), "sample_frame_rate must be an integer >= 1"),
])
def test_bad_arguments_fail_before_the_file_is_touched(tmp_path, kwargs, words):
    # the path does not exist: the argument error must win, so nothing is opened or decoded first
    args = dict(n_sample_frames=8, height=64, width=64) | kwargs
    with pytest.raises(VideoError, match=words):
        read_video_frames(tmp_path / "absent.mp4", **args)


# ---------------------------------------------------------------------------------------------- writing
def moving_frames(n=6, h=32, w=48):
    yy, xx = np.mgrid[0:h, 0:w]
    background = np.stack([255 * xx // w, 255 * yy // h, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    frames = np.repeat(background[None], n, axis=0)
    for t in range(n):
        frames[t, :, 4 * t:4 * t + 4] = 255  # a bar that moves, so no two frames are identical
    return frames


def test_gif_round_trip_frames_size_and_duration(tmp_path):
    path = write_video(moving_frames(), tmp_path / "out.gif", fps=8)
    back = imageio.v3.imread(path, index=None, mode="RGB")
    assert back.shape == (6, 32, 48, 3)
    with Image.open(path) as im:
        # 1000/8 = 125 ms; GIF stores centiseconds, so it reads back as 120 ms (as the official GIFs do)
        assert im.info["duration"] == 120
        assert im.info["loop"] == 0
    write_video(moving_frames(), tmp_path / "ten.gif", fps=10)
    with Image.open(tmp_path / "ten.gif") as im:
        assert im.info["duration"] == 100


def test_mp4_round_trip_frames_size_and_fps(tmp_path):
    path = write_video(moving_frames(), tmp_path / "out.mp4", fps=8)
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(8)
    cap.release()
    back = read_video_frames(path, 6, height=32, width=48)
    assert back.shape == (6, 32, 48, 3)
    assert np.abs(back.astype(int) - moving_frames()).mean() < 8  # lossy, but the same picture
    with pytest.raises(VideoError, match="has 6 frames"):
        read_video_frames(path, 7, height=32, width=48)


def test_mp4_of_odd_size_is_padded_to_even(tmp_path):
    path = write_video(moving_frames(h=31, w=47), tmp_path / "odd.mp4", fps=8)
    cap = cv2.VideoCapture(str(path))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape[:2] == (32, 48)


def test_png_frames_go_to_a_folder_named_after_the_stem(tmp_path):
    frames = moving_frames()
    folder = write_video(frames, tmp_path / "sub" / "clip.png")
    assert folder == tmp_path / "sub" / "clip"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(6)]
    back = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(folder.iterdir())])
    np.testing.assert_array_equal(back, frames)  # png is lossless
    write_video(frames[:3], tmp_path / "sub" / "clip.png")  # replacing an existing folder
    assert len(list(folder.iterdir())) == 3


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(VideoError, match="unknown video format 'avi'"):
        write_video(moving_frames(), tmp_path / "x.avi")


def test_unwritable_location_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(VideoError, match=r"output directory .*a_file/out is not writable"):
        check_writable_dir(blocker / "out")
    with pytest.raises(VideoError, match="not writable"):
        write_video(moving_frames(), blocker / "out" / "v.gif")


def leftovers(directory, keep):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_failed_gif_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "result.gif"
    write_video(moving_frames(), target)
    old = target.read_bytes()

    def crash_midway(path, *args, **kwargs):
        Path(path).write_bytes(b"GIF89a half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(imageio.v3, "imwrite", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(moving_frames()[:2], target)
    assert target.read_bytes() == old
    assert leftovers(tmp_path, {"result.gif"}) == []


def test_failed_mp4_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "result.mp4"
    write_video(moving_frames(), target)
    old = target.read_bytes()
    real_get_writer = imageio.v2.get_writer

    def writer_that_dies_on_frame_3(*args, **kwargs):
        writer = real_get_writer(*args, **kwargs)
        real_append, count = writer.append_data, [0]

        def append_data(frame):
            count[0] += 1
            if count[0] == 3:
                raise RuntimeError("encoder died")
            real_append(frame)

        writer.append_data = append_data
        return writer

    monkeypatch.setattr(imageio.v2, "get_writer", writer_that_dies_on_frame_3)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(moving_frames(), target)
    assert target.read_bytes() == old
    assert leftovers(tmp_path, {"result.mp4"}) == []


def test_failed_png_write_keeps_the_old_folder_and_leaves_no_temp(tmp_path, monkeypatch):
    folder = write_video(moving_frames(), tmp_path / "frames.png")
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_imwrite, count = cv2.imwrite, [0]

    def imwrite_dies_on_frame_3(name, image, *args):
        count[0] += 1
        if count[0] == 3:
            raise OSError("disk full")
        return real_imwrite(name, image, *args)

    monkeypatch.setattr(video.cv2, "imwrite", imwrite_dies_on_frame_3)
    with pytest.raises(OSError, match="disk full"):
        write_video(moving_frames()[::-1], tmp_path / "frames.png")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old
    assert leftovers(tmp_path, {"frames"}) == []


# ---------------------------------------------------------------------------------------------- grids
def constant_videos(b, f=3, h=8, w=16):
    """Video k is filled with the value 10 * (k + 1) (as floats in [0, 1])."""
    levels = 10.0 * (np.arange(b, dtype=np.float32) + 1) / 255.0
    return np.broadcast_to(levels[:, None, None, None, None], (b, 3, f, h, w)).copy()


def test_grid_of_one_video_is_the_video_without_padding():
    videos = constant_videos(1)
    grid = make_grid_frames(videos, n_rows=4)
    assert grid.shape == (3, 8, 16, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid, video_to_uint8(videos)[0].transpose(1, 2, 3, 0))


def test_grid_of_five_videos_four_per_row_with_2px_zero_padding():
    h, w, pad = 8, 16, 2
    grid = make_grid_frames(constant_videos(5, h=h, w=w), n_rows=4)
    assert grid.shape == (3, 2 * (h + pad) + pad, 4 * (w + pad) + pad, 3)
    expected = np.zeros(grid.shape[1:3], np.int64)
    for k in range(5):
        y, x = (k // 4) * (h + pad) + pad, (k % 4) * (w + pad) + pad
        expected[y:y + h, x:x + w] = int(np.float32(10 * (k + 1) / 255.0) * np.float32(255))
    for t in range(3):
        for c in range(3):
            np.testing.assert_array_equal(grid[t, :, :, c], expected)
    # padding rows/columns and the three empty cells of the second row are zero
    assert not grid[:, :pad].any() and not grid[:, :, :pad].any()
    assert not grid[:, pad + h:2 * pad + h].any()
    assert not grid[:, h + 2 * pad:, w + 2 * pad:].any()


def test_video_to_uint8_truncates_and_clamps():
    x = np.array([0.0, 1.0, 0.999, 0.5, -0.2, 1.3, np.nan], np.float32)
    np.testing.assert_array_equal(video_to_uint8(x), [0, 255, 254, 127, 0, 255, 0])


def test_save_videos_grid_writes_the_grid_as_gif(tmp_path):
    videos = np.random.default_rng(0).random((2, 3, 4, 16, 24), dtype=np.float32)
    path = save_videos_grid(videos, tmp_path / "samples" / "grid.gif", n_rows=4, fps=8)
    back = imageio.v3.imread(path, index=None, mode="RGB")
    assert back.shape == (4, 16 + 4, 2 * (24 + 2) + 2, 3)


# ---------------------------------------------------------------------------------------------- demo clip
def test_demo_clip_is_readable_and_moves(demo_mp4):
    frames = read_video_frames(demo_mp4, 16, height=64, width=64)
    assert frames.shape == (16, 64, 64, 3)
    step = [np.abs(frames[t + 1].astype(int) - frames[t]).mean() for t in range(15)]
    assert min(step) > 0.5  # every frame differs from the previous one
    assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 10


def test_demo_clip_is_deterministic_and_seeded(tmp_path):
    a = make_demo_clip(tmp_path / "a.png", n_frames=4, height=32, width=40, seed=3)
    b = make_demo_clip(tmp_path / "b.png", n_frames=4, height=32, width=40, seed=3)
    c = make_demo_clip(tmp_path / "c.png", n_frames=4, height=32, width=40, seed=4)
    read = lambda folder: read_video_frames(folder, 4, height=32, width=40)  # noqa: E731
    np.testing.assert_array_equal(read(a), read(b))
    assert not np.array_equal(read(a), read(c))


def test_demo_clip_as_gif(tmp_path):
    path = make_demo_clip(tmp_path / "demo.gif", n_frames=8, height=32, width=32)
    for backend in ("ffmpeg", "opencv"):
        assert read_video_frames(path, 8, height=32, width=32, resize_backend=backend).shape == (8, 32, 32, 3)


@pytest.mark.parametrize("fmt", ["gif", "mp4"])
def test_written_videos_get_ordinary_permissions_respecting_the_umask(tmp_path, fmt):
    previous = os.umask(0o022)
    try:
        path = write_video(moving_frames(), tmp_path / f"clip.{fmt}")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # mkstemp alone leaves 0600
        os.umask(0o002)
        path = write_video(moving_frames(), tmp_path / f"shared.{fmt}")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o664
    finally:
        os.umask(previous)


def test_png_folders_get_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        folder = write_video(moving_frames(), tmp_path / "frames.png")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755  # mkdtemp alone leaves 0700
    assert {stat.S_IMODE(os.stat(f).st_mode) for f in folder.iterdir()} == {0o644}


def test_errors_speak_of_the_callers_option_names(demo_mp4):
    names = {"n_sample_frames": "--video_length", "sample_frame_rate": "--sample_frame_rate",
             "sample_start_idx": "--sample_start_idx"}
    with pytest.raises(VideoError, match="of the --video_length=10 requested") as info:
        read_video_frames(demo_mp4, 10, sample_frame_rate=2, height=64, width=64, option_names=names)
    assert "n_sample_frames" not in str(info.value)
    with pytest.raises(VideoError, match="--height must be a positive multiple of 8, got 60"):
        read_video_frames(demo_mp4, 4, height=60, width=64, option_names={"height": "--height"})


def test_the_demo_clip_gets_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        clip = make_demo_clip(tmp_path / "demo.mp4", n_frames=4, height=32, width=32)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(clip).st_mode) == 0o644
