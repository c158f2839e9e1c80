"""Whether an S3 image's objects were made with the object size it is being opened with.

The layout (``KEY/%016x``, nbdkit's S3 plugin's) stores no object size: an image reopened with another one
would read every object as damaged (each read failing with EIO, a warning per object) and, worse, a partial
write would rewrite objects at the wrong size. But the objects themselves say it: every object of an image has
the object size, so when most of those listed at start-up agree on another power of two, the image was made
with that one, and it is refused at once, naming both sizes. A few objects of odd sizes among many of the
right one are damage (someone else's objects, a broken upload), which the device reports request by request.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["check_object_size"]


def check_object_size(image: str, sizes: Counter[int], object_size: int) -> None:
    """Raise ValueError when the listed objects' ``sizes`` (size: how many objects have it) say that ``image``
    was made with an object size other than ``object_size``."""
    if not sizes:
        return  # an image without objects reads as zeros whatever the object size
    found, count = sizes.most_common(1)[0]
    if found == object_size or found & (found - 1) or count * 2 <= sum(sizes.values()):
        return
    raise ValueError(
        f"{image} was made with objects of {found} bytes ({count} of its {sum(sizes.values())} objects have that "
        f"size), not {object_size}: open it with that object size"
    )
