"""Objects that end and objects that cross (issue 30, item 4): propagation's ids follow the objects
(object_tracks.py), on drawn label maps and with the demo model through the real video path."""

import numpy as np
from PIL import Image

from seggpt_plugins.cli import main
from seggpt_plugins.object_tracks import MIN_AREA, ObjectTracks, one_piece_ids
from seggpt_plugins.propagation import _object_tracks
from seggpt_plugins.scenes import moving_objects, parted_frame

from .test_video import encode


def iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def disks(centres, size=(64, 96), radius=8) -> np.ndarray:
    """A label map with disk i+1 at centres[i] (later ids on top)."""
    yy, xx = np.mgrid[:size[0], :size[1]]
    labels = np.zeros(size, np.uint8)
    for label_id, (y, x) in enumerate(centres, 1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 < radius ** 2] = label_id
    return labels


# ------------------------------------------------------------------------------------------ drawn maps


def test_crossing_disks_painted_in_one_colour_keep_their_ids():
    """Two disks meet head-on and part; the 'painting' gives both the colour of the one on top from the
    meeting on (as the demo model did): the followed ids come back apart, each on its own disk."""
    path = [(32, 20 + 3 * t, 32, 76 - 3 * t) for t in range(19)]
    tracks = ObjectTracks(disks([(32, 20), (32, 76)]), [1, 2])
    for t, (y1, x1, y2, x2) in enumerate(path[1:], 1):
        truth = disks([(y1, x1), (y2, x2)])
        painted = np.where(truth > 0, 2, 0) if t >= 7 else truth  # from the meeting on
        followed = tracks.follow(painted)
    assert iou(followed == 1, truth == 1) > 0.8 and iou(followed == 2, truth == 2) > 0.8


def test_an_object_that_is_gone_ends_and_its_colour_is_background_after():
    """Disk 1 vanishes at frame 5; its colour painted later over the background (a ghost) stays background,
    and disk 2 keeps its id throughout."""
    tracks = ObjectTracks(disks([(20, 20), (40, 70)]), [1, 2])
    for t in range(1, 10):
        painted = disks([(20, 20 + t), (40, 70 - t)])
        if t >= 5:
            painted[painted == 1] = 0
        if t >= 7:
            painted[50:60, 10:25] = 1  # the ended id's colour, over background
        followed = tracks.follow(painted)
        assert not (followed == 1).any() if t >= 5 else (followed == 1).sum() > 100
        assert iou(followed == 2, painted == 2) > 0.9
    assert tracks.ended == [1]


def test_only_object_annotations_are_followed():
    """Ids that are each one piece are objects (followed); an id in several pieces is a class (not)."""
    objects = disks([(20, 20), (40, 70)])
    classes = np.where(objects > 0, 1, 0).astype(np.uint8)  # one id, two pieces
    assert one_piece_ids(objects) == [1, 2] and one_piece_ids(classes) == []
    assert _object_tracks(objects) is not None and _object_tracks(classes) is None
    assert _object_tracks(np.dstack([objects] * 3)) is None  # a colour mask: classes


# ------------------------------------------------------------------------------------------ demo model


def test_an_object_that_is_gone_ends_in_a_propagated_video(demo_model):
    """Generated video (scenes.py "ending", seed 0): ids 1 and 3 vanish mid-video. After each is gone its id
    paints nothing (no id over background); painted by colour alone (before), id 3 carried on."""
    frames, truth = moving_objects("ending", seed=0)
    for follow in (True, False):
        found = {p.index: p.labels for p in demo_model.propagate(frames, annotations={0: truth[0]},
                                                                 follow_objects=follow)}
        ghosts = [(z, i) for z, labels in found.items() for i in (1, 3)
                  if not (truth[z:] == i).any() and np.count_nonzero(labels == i) >= MIN_AREA]
        if follow:
            assert not ghosts, ghosts
        else:
            assert len(ghosts) >= 5  # (what this test guards against)


def test_crossing_objects_keep_their_ids_through_a_video_file(demo_model, tmp_path):
    """A generated crossing (scenes.py "crossing", seed 0), written as H.264 with PyAV and run through
    `seggpt propagate VIDEO --prompt-frame 0`: after the two alike objects part, each keeps its id
    (per-object IoU >= 0.6; by colour alone, object 1's IoU there was 0: the two had merged)."""
    frames, truth = moving_objects("crossing", seed=0, objects=2)
    encode(tmp_path / "crossing.mp4", frames, options={"crf": "12"})
    Image.fromarray(truth[0]).save(tmp_path / "m0.png")
    out = tmp_path / "out"
    assert main(["propagate", str(tmp_path / "crossing.mp4"), "--prompt-frame", "0", str(tmp_path / "m0.png"),
                 "--out", str(out), "--model", "demo", "--format", "png"]) == 0
    labels = {z: np.asarray(Image.open(out / f"{z:06d}_labels.png")) for z in range(len(frames))}
    after = range(parted_frame(truth), len(frames))
    assert len(after) >= 5
    for i in (1, 2):
        score = np.mean([iou(labels[z] == i, truth[z] == i) for z in after])
        assert score >= 0.6, (i, score)
