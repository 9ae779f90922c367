"""The DreamBooth paper's evaluation prompts (Ruiz et al. 2023, supplementary material).

25 prompts for objects and 25 for live subjects (the dataset's cats and dogs), as the paper's
dataset release lists them (prompts_and_classes.txt): `{0}` is the unique identifier (e.g.
"sks"), `{1}` the class noun (e.g. "dog"). The first 10 and the last 5 are shared; the middle
10 are recontextualisations for objects and accessories/outfits for live subjects.
tests/test_evaluate_prompts.py checks these against the dataset's own file.
"""

OBJECT_PROMPTS = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)

LIVE_PROMPTS = (
    *OBJECT_PROMPTS[:10],
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    *OBJECT_PROMPTS[20:],
)

PROMPT_LISTS = {"object": OBJECT_PROMPTS, "live": LIVE_PROMPTS}
# The dataset's live subjects; every other class of its subject table is an object.
LIVE_CLASSES = ("dog", "cat")


def subject_prompts(templates: tuple[str, ...] | list[str], identifier: str, class_noun: str) -> list[str]:
    """The templates with the identifier and class noun filled in. Plain replacement, not
    str.format, so that a prompt file's other braces are kept as written."""
    return [template.replace("{0}", identifier).replace("{1}", class_noun) for template in templates]
