"""Several subjects in one run: data.subjects parsed and checked (one line naming the key, before
any model loads), caption templates and .txt captions, caption dropout that leaves every other
draw as it was, repeats, shared class folders, validation prompts for every subject."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from photo_sets import refused_before_models, subjects_override
from train_runs import SETUPS, train_args

import train
from minidream.config import TINY, ConfigError
from minidream.models.pipeline import random_pipeline
from minidream.training.batches import DreamBoothBatches, LatentSource
from minidream.training.config_file import load_train_config, save_config
from minidream.training.order import Item, RankOrder
from minidream.training.plan import pair_classes, plan_items
from minidream.training.subjects import (
    class_sets,
    scan_classes,
    scan_subject,
    subjects_of,
)

TWO = SETUPS["subjects"].overrides  # photo_sets.write_two_subjects' dog and cat, buckets and masks on
BUCKETS = [(48, 80), (64, 64), (80, 48)]  # data.resolution=64, data.bucket_step=16


def config(data, *overrides):
    return load_train_config(train.DEFAULT_CONFIG, [o.replace("<data>", str(data)) for o in (*TWO, *overrides)])


def test_the_single_subject_keys_are_one_subject(training_data):
    cfg = load_train_config(train.DEFAULT_CONFIG, [f"data.instance_dir={training_data / 'dog'}", "eval.identifier=qwe"])
    (subject,) = subjects_of(cfg)
    assert (subject.name, subject.instance_dir, subject.instance_prompt, subject.class_dir, subject.repeats) == (
        "dog", str(training_data / "dog"), "a photo of sks toy", "runs/tiny/class-images", 1)
    assert (subject.identifier, subject.class_noun, subject.num_class_images) == ("qwe", "dog", 8)


def test_keys_a_subject_leaves_out_take_the_single_subject_values(training_data):
    entries = (f"data.subjects=[{{instance_dir: {training_data}/dog, instance_prompt: a sks dog, name: rex, repeats: 3}}, "
               f"{{instance_dir: {training_data}/cat, instance_prompt: a zwx cat, class_prompt: a cat, class_dir: {training_data}/cc}}]")
    cfg = load_train_config(train.DEFAULT_CONFIG, [entries, "data.class_prompt=a toy", "data.num_class_images=5"])
    rex, cat = subjects_of(cfg)
    assert (rex.name, rex.repeats, rex.class_prompt, rex.class_dir, rex.num_class_images) == ("rex", 3, "a toy", "runs/tiny/class-images", 5)
    assert (cat.name, cat.class_prompt, cat.class_dir) == ("cat", "a cat", f"{training_data}/cc")


def test_two_subjects_of_one_class_share_its_folder(training_data):
    shared = subjects_override("<data>").replace("class-cat", "class-dog").replace("a photo of a cat", "a photo of a dog")
    subjects = subjects_of(config(training_data, shared))
    assert class_sets(subjects) == {f"{training_data}/class-dog": [0, 1]}  # generated once, for both


@pytest.mark.parametrize(
    "changes, message",
    [
        ([("instance_prompt: 'a photo of zwx cat', ", "")], r"error: data.subjects\[1\].instance_prompt is missing: every subject needs instance_dir and instance_prompt"),
        ([("instance_dir: '<data>/cat', ", "")], r"error: data.subjects\[1\].instance_dir is missing"),
        ([("identifier: zwx", "identifier: sks"), ("of zwx cat", "of sks cat")], r"error: data.subjects\[1\].identifier='sks' is also data.subjects\[0\]'s: give each subject its own identifier"),
        ([("a photo of zwx cat", "a photo of sks dog")], r"error: data.subjects\[1\].instance_prompt='a photo of sks dog' is also data.subjects\[0\]'s"),
        ([("class_noun: cat", "colour: black")], r"error: override data.subjects\[1\]: unknown key 'colour' \(valid: "),
        ([("class-cat", "class-dog")], r"error: data.subjects\[1\].class_prompt='a photo of a cat' differs from data.subjects\[0\]'s .*give each class its own class_dir"),
    ],
    ids=["no instance_prompt", "no instance_dir", "same identifier", "same instance prompt", "unknown key", "one folder, two class prompts"],
)
def test_a_bad_subject_list_gets_one_line_naming_the_key_before_any_model_loads(changes, message, tmp_path, training_data, monkeypatch, capsys):
    subjects = subjects_override("<data>")
    for old, new in changes:
        assert old in subjects
        subjects = subjects.replace(old, new)
    argv = train_args(tmp_path / "run", training_data, (*TWO, subjects))
    assert re.match(message, refused_before_models(monkeypatch, capsys, argv))


def test_an_unreadable_image_of_a_subject_is_named_before_any_model_loads(tmp_path, training_data, monkeypatch, capsys):
    (training_data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    try:
        error = refused_before_models(monkeypatch, capsys, train_args(tmp_path / "run", training_data, TWO))
    finally:
        (training_data / "cat" / "broken.jpg").unlink()
    assert error.startswith(f"error: {training_data / 'cat' / 'broken.jpg'}: cannot decode image")


def test_a_template_with_another_field_is_refused(training_data):
    with pytest.raises(ConfigError, match=r"data.caption_template='a photo of \{name\}': only \{identifier\} and \{class\}"):
        config(training_data, "data.caption_template=a photo of {name}")
    with pytest.raises(ConfigError, match=r"data.subjects\[0\].identifier is missing: data.caption_template fills in \{identifier\}"):
        config(training_data, subjects_override("<data>").replace("identifier: sks, ", ""))


def two_subject_batches(data, caption_dropout):
    cfg = config(data)
    subjects = subjects_of(cfg)
    instances = [scan_subject(s, cfg.data, BUCKETS) for s in subjects]
    classes = [scan_classes(s.class_dir, s, cfg.data, BUCKETS) for s in subjects]
    plan = pair_classes(plan_items([s.name for s in subjects], instances, [1, 1], [4, 4], BUCKETS, 64, 2), classes)
    source = LatentSource(random_pipeline(TINY, seed=0).vae, False, True, 0.18215, None)
    return plan, DreamBoothBatches(plan, source, seed=0, caption_dropout=caption_dropout, masks=True)


def test_the_template_fills_each_subjects_prompt_and_a_txt_caption_wins(training_data):
    plan, _ = two_subject_batches(training_data, 0.0)
    prompts = {e.path.name if "cat" not in str(e.path) else "cat/" + e.path.name: e.prompt for e in plan.instances}
    assert prompts["00.png"] == "a photo of sks dog" and prompts["cat/00.png"] == "a photo of zwx cat"
    assert prompts["cat/03.png"] == "a photo of zwx cat on a sofa"  # cat/03.txt
    assert {plan.classes[i.klass].prompt for i in plan.items} == {"a photo of a dog", "a photo of a cat"}


def test_caption_dropout_empties_instance_prompts_only_and_changes_no_other_draw(training_data):
    plan, plain = two_subject_batches(training_data, 0.0)
    _, dropping = two_subject_batches(training_data, 0.5)
    dropped = kept = 0
    for epoch in range(3):
        order = RankOrder(plan, seed=0, rank=0, world_size=1).of_epoch(epoch)
        for j in range(0, len(order), 2):
            items = [Item(order[j + i], epoch, j + i) for i in range(2)]
            a, b = plain.batch(items), dropping.batch(items)
            assert torch.equal(a.latents, b.latents) and torch.equal(a.masks, b.masks)
            assert [torch.equal(g.get_state(), h.get_state()) for g, h in zip(a.generators, b.generators)] == [True] * 4
            assert b.prompts[2:] == a.prompts[2:]  # class prompts: the prior is never dropped
            for was, now in zip(a.prompts[:2], b.prompts[:2]):
                assert now in (was, "")
                dropped, kept = dropped + (now == ""), kept + (now == was)
    assert dropped >= 6 and kept >= 6  # 24 instance samples at p = 0.5 (seeded, so always the same count)


def test_repeats_list_a_subjects_images_that_many_times_an_epoch(training_data):
    cfg = config(training_data)
    subjects = subjects_of(cfg)
    instances = [scan_subject(s, dataclasses.replace(cfg.data, masks=False), BUCKETS) for s in subjects]
    plan = plan_items(["dog", "cat"], instances, [3, 1], [0, 0], BUCKETS, 64, 2)
    assert [i.subject for i in plan.items] == [0] * 12 + [1] * 4
    assert [i.instance for i in plan.items[:12]] == [0, 1, 2, 3] * 3


def test_validation_prompts_name_every_subject(training_data):
    cfg = config(training_data, "validation.prompts=[a photo of sks dog on the beach]")
    assert train.validation_prompts(cfg, subjects_of(cfg)) == ["a photo of sks dog on the beach", "a photo of zwx cat"]


def test_the_subjects_preset_loads_and_its_saved_config_loads_back(tmp_path):
    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "dreambooth-subjects-sd15.yaml", [])
    assert [s.name for s in subjects_of(cfg)] == ["dog", "cat"]
    assert [s.prompt(cfg.data.caption_template) for s in subjects_of(cfg)] == ["a photo of sks dog", "a photo of zwx cat"]
    save_config(cfg, tmp_path / "config.yaml")  # what a resumed run reads back
    assert load_train_config(tmp_path / "config.yaml", []) == cfg
