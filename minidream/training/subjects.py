"""The subjects of a run: `data.subjects`, or the single subject of the data.* keys (the shorthand).

Each subject has its own instance folder and prompt, and its own class set; subjects naming the
same class_dir share it (its images are generated once). Everything is checked here, before any
model loads, with one line naming `data.subjects[i].key`.
"""

from dataclasses import dataclass
from pathlib import Path

from minidream.config import ConfigError, DataSection, SubjectEntry, TrainConfig
from minidream.training.buckets import Size
from minidream.training.data import Example, find_images, scan_images
from minidream.training.masks import with_masks

TEMPLATE_FIELDS = {"identifier": "identifier", "class": "class_noun"}  # {field} in data.caption_template -> Subject attribute


@dataclass(frozen=True)
class Subject:
    name: str  # metrics.jsonl logs loss/<name>
    instance_dir: str
    instance_prompt: str
    class_dir: str | None  # None: no prior preservation for this subject
    class_prompt: str
    num_class_images: int
    repeats: int
    identifier: str | None
    class_noun: str | None

    def prompt(self, template: str | None) -> str:
        """The prompt of an image without its own caption: the template filled in, else instance_prompt."""
        if template is None:
            return self.instance_prompt
        return template.format(identifier=self.identifier, **{"class": self.class_noun})


def subjects_of(config: TrainConfig) -> list[Subject]:
    """The run's subjects, checked; the shorthand is one subject (identifier and class: eval.*)."""
    data = config.data
    if not data.subjects:
        name = Path(data.instance_dir).name or "subject"
        subjects = [Subject(name, data.instance_dir, data.instance_prompt, data.class_dir, data.class_prompt,
                            data.num_class_images, 1, config.eval.identifier, config.eval.class_noun)]
    else:
        subjects = [subject_of(entry, config, f"data.subjects[{i}]") for i, entry in enumerate(data.subjects)]
    check_template(data.caption_template, subjects, bool(data.subjects))
    check_distinct(subjects)
    check_shared_class_dirs(subjects)
    return subjects


def subject_of(entry: SubjectEntry, config: TrainConfig, where: str) -> Subject:
    data = config.data
    for key in ("instance_dir", "instance_prompt"):
        if not getattr(entry, key):
            raise ConfigError(f"{where}.{key} is missing: every subject needs instance_dir and instance_prompt")
    if entry.repeats < 1:
        raise ConfigError(f"{where}.repeats must be at least 1, got {entry.repeats}")
    if entry.num_class_images is not None and entry.num_class_images < 1:
        raise ConfigError(f"{where}.num_class_images must be at least 1, got {entry.num_class_images}")

    def value(key: str):
        own = getattr(entry, key)
        return getattr(data, key) if own is None else own

    return Subject(
        entry.name or Path(entry.instance_dir).name, entry.instance_dir, entry.instance_prompt, value("class_dir"),
        value("class_prompt"), value("num_class_images"), entry.repeats, entry.identifier, entry.class_noun,
    )


def check_template(template: str | None, subjects: list[Subject], listed: bool) -> None:
    if template is None:
        return
    try:
        template.format(identifier="x", **{"class": "y"})
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"data.caption_template={template!r}: only {{identifier}} and {{class}} can be filled in ({error!r})") from None
    for i, subject in enumerate(subjects):
        for field, key in TEMPLATE_FIELDS.items():
            if "{" + field + "}" in template and getattr(subject, key) is None:
                where = f"data.subjects[{i}].{key}" if listed else f"eval.{key}"
                raise ConfigError(f"{where} is missing: data.caption_template fills in {{{field}}}")


def check_distinct(subjects: list[Subject]) -> None:
    """Two subjects with one identifier, prompt or name would train (or log) as one."""
    for key in ("name", "instance_prompt", "identifier"):
        seen = {}
        for i, subject in enumerate(subjects):
            value = getattr(subject, key)
            if value is not None and value in seen:
                raise ConfigError(f"data.subjects[{i}].{key}={value!r} is also data.subjects[{seen[value]}]'s: "
                                  f"give each subject its own {key}")
            seen.setdefault(value, i)


def check_shared_class_dirs(subjects: list[Subject]) -> None:
    """A class folder is generated from one prompt: subjects sharing it must agree on the prompt."""
    prompts = {}
    for i, subject in enumerate(subjects):
        if (subject.class_dir is None) != (subjects[0].class_dir is None):  # a batch has class samples for all or none
            raise ConfigError(f"data.subjects[{i}].class_dir: prior preservation is on for some subjects only; "
                              "give every subject a class_dir, or none")
        if subject.class_dir is None:
            continue
        first = prompts.setdefault(subject.class_dir, (i, subject.class_prompt))
        if first[1] != subject.class_prompt:
            raise ConfigError(f"data.subjects[{i}].class_prompt={subject.class_prompt!r} differs from data.subjects[{first[0]}]'s "
                              f"{first[1]!r}, and both use class_dir {subject.class_dir}: give each class its own class_dir")


def class_sets(subjects: list[Subject]) -> dict[str, list[int]]:
    """Each class folder and the subjects that share it, in order of first use."""
    shared: dict[str, list[int]] = {}
    for i, subject in enumerate(subjects):
        if subject.class_dir is not None:
            shared.setdefault(subject.class_dir, []).append(i)
    return shared


def scan_subject(subject: Subject, data: DataSection, buckets: list[Size] | None) -> list[Example]:
    """The subject's instance images, checked (data.scan_images), their prompts filled in and, with
    data.masks, their masks attached and checked."""
    prompt = subject.prompt(data.caption_template)
    examples = scan_images(subject.instance_dir, prompt, data.resolution, data.skip_bad_images, "instance", buckets=buckets)
    return with_masks(examples, subject.instance_dir) if data.masks else examples


def scan_classes(folder: str, subject: Subject, data: DataSection, buckets: list[Size] | None) -> list[Example]:
    return scan_images(folder, subject.class_prompt, data.resolution, data.skip_bad_images, "class", use_captions=False,
                       buckets=buckets)


def class_count(folder: str, wanted: int) -> int:
    """How many images a class folder will hold once prior.py has filled it to `wanted`."""
    return max(wanted, len(find_images(folder, "class")) if Path(folder).is_dir() else 0)
