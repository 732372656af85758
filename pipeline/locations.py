"""What lies at an input location, as ``DocumentRef`` records: local folders (links inside the input listed
where their target is, targets outside it once), files and globs, S3 prefixes and globs (paginated), and
list files of URIs; and the same cut into shards (``listing_shards``) that the listing stage walks in
parallel (pipeline/listing.py)."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import StorageConfig
from pipeline.records import DocumentRef
from pipeline.storage import (
    StorageError,
    check_bucket,
    describe_client_error,
    filesystem_for,
    is_s3,
    local_uri,
    s3_client,
    split_s3,
)

GLOB_CHARS = "*?["
URI_LIST_SUFFIX = ".txt"
INLINE_COMMENT = re.compile(r"(^|[ \t])#.*$")  # in a list file: a comment, not part of a name


class InputError(ValueError):
    """The input location does not exist or holds no files."""


@dataclass(frozen=True)
class ListingShard:
    """One part of an input's listing, walked by one task, so that a listing's documents go on to be read
    while the rest is still being listed: the input itself (``whole``), a folder or key prefix with all that
    lies below it, or only the files directly in one (``recursive=False``, their subfolders being shards of
    their own). ``location`` is a path, the input's URI, or in ``bucket`` a key prefix; ``root`` is the input
    folder, ``pattern`` the glob an S3 key must match."""

    location: str
    whole: bool = False
    recursive: bool = True
    root: str = ""
    bucket: str = ""
    pattern: str | None = None


def listing_shards(input_uri: str, storage: StorageConfig, max_pages: int = 10) -> list[ListingShard]:
    """An input's listing in shards, in listing order: a folder or prefix is cut at its first level (one
    shard for its own files, one per subfolder; a level of one subfolder only is stepped through). A list
    file, a local glob or a file is one shard, as is a prefix whose first level takes more than
    ``max_pages`` listing requests (a flat bucket: finding its subfolders would mean listing it all)."""
    whole = [ListingShard(input_uri, whole=True)]
    if input_uri.endswith(URI_LIST_SUFFIX) and not any(char in input_uri for char in GLOB_CHARS):
        return whole
    if is_s3(input_uri):
        bucket, key = split_s3(input_uri)
        prefix, pattern = _s3_pattern(key)
        level = _first_level(prefix, lambda location: _s3_level(bucket, location, storage, max_pages, input_uri))
        if level is None:
            return whole
        prefix, keys, subprefixes = level
        own = [ListingShard(prefix, recursive=False, bucket=bucket, pattern=pattern)] if keys else []
        return own + [ListingShard(sub, bucket=bucket, pattern=pattern) for sub in subprefixes] or whole
    if any(char in input_uri for char in GLOB_CHARS) or not Path(input_uri).expanduser().is_dir():
        return whole
    root = str(Path(input_uri).expanduser().resolve())
    level = _first_level(root, _local_level)
    if level is None:
        return whole
    folder, files, subfolders = level
    own = [ListingShard(folder, recursive=False, root=root)] if files else []
    return own + [ListingShard(sub, root=root) for sub in subfolders] or whole


def _first_level(
    location: str, level_of: Callable[[str], tuple[bool, list[str]] | None]
) -> tuple[str, bool, list[str]] | None:
    """The first level below ``location`` that holds files or more than one subfolder (``level_of``: whether
    a location holds files, and its subfolders in name order; None when that cannot be told)."""
    while (level := level_of(location)) is not None:
        files, subfolders = level
        if len(subfolders) != 1 or files:
            return location, files, subfolders
        location = subfolders[0]
    return None


def _local_level(folder: str) -> tuple[bool, list[str]] | None:
    try:
        with os.scandir(folder) as entries:
            files, subfolders = False, []
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(entry.path)
                else:
                    files = True
    except OSError:
        return None
    return files, sorted(subfolders)


def _s3_pattern(key: str) -> tuple[str, str | None]:
    """An S3 input's key prefix to list, and its glob (None for a plain prefix)."""
    if not any(char in key for char in GLOB_CHARS):
        return key, None
    return key[: min(key.index(char) for char in GLOB_CHARS if char in key)], key


def _s3_level(
    bucket: str, prefix: str, storage: StorageConfig, max_pages: int, uri: str
) -> tuple[bool, list[str]] | None:
    """Whether keys lie directly under ``prefix``, and its subprefixes; None past ``max_pages`` requests."""
    from botocore.exceptions import BotoCoreError, ClientError

    keys, subprefixes = False, []
    paginator = s3_client(storage).get_paginator("list_objects_v2")
    try:
        for number, page in enumerate(paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")):
            if number == max_pages:
                return None
            keys = keys or bool(page.get("Contents"))
            subprefixes += [entry["Prefix"] for entry in page.get("CommonPrefixes", [])]
    except (BotoCoreError, ClientError) as error:
        raise StorageError(describe_client_error(error, f"listing {uri}")) from None
    return keys, subprefixes


def _list_s3(
    bucket: str, prefix: str, storage: StorageConfig, pattern: str | None = None, recursive: bool = True
) -> Iterator[DocumentRef]:
    """The objects under ``prefix`` (``recursive=False``: only those not below a further "/") that match
    ``pattern``, a page of 1000 keys a request, yielded as they arrive."""
    from botocore.exceptions import BotoCoreError, ClientError

    paginator = s3_client(storage).get_paginator("list_objects_v2")
    folders = {} if recursive else {"Delimiter": "/"}
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": 1000}, **folders):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/") or (pattern and not fnmatch.fnmatchcase(item["Key"], pattern)):
                    continue
                etag = item["ETag"].strip('"')
                yield DocumentRef(f"s3://{bucket}/{item['Key']}", int(item["Size"]), etag, etag)
    except (BotoCoreError, ClientError) as error:
        raise StorageError(describe_client_error(error, f"listing s3://{bucket}/{prefix}")) from None


def _list_local(uri: str, claim: Callable[[Path], bool]) -> Iterator[DocumentRef]:
    if any(char in uri for char in GLOB_CHARS):
        for path in sorted(set(_glob(os.path.expanduser(uri), claim))):
            yield _local_ref(path)
        return
    root = Path(uri).expanduser()
    if not root.exists():
        raise InputError(f"input {uri} does not exist")
    if not root.is_dir():
        yield _local_ref(root.resolve())
        return
    yield from _walk(root.resolve(), root.resolve(), claim)


def _glob(pattern: str, claim: Callable[[Path], bool]) -> Iterator[Path]:
    """The files ``pattern`` matches (``glob.glob``'s rules, ``**`` any number of folders), resolved. The
    input is the folder above the first part with a wildcard; a link that leaves it is followed only where
    ``claim`` grants it, as in ``_walk`` (``glob.glob`` followed every link, a link to ``/`` taking the
    whole filesystem, and a link to a folder above the input, round and round until the path got too long).
    Each folder is entered once per place in the pattern, so a link loop inside the input ends too."""
    parts = Path(pattern).parts
    fixed = next(index for index, part in enumerate(parts) if any(char in part for char in GLOB_CHARS))
    root, rest = Path(*parts[:fixed]).resolve() if fixed else Path.cwd(), parts[fixed:]

    def closure(places: set[int]) -> set[int]:  # a ``**`` may match no folder at all
        reached = set(places)
        for place in sorted(places):
            while place < len(rest) and rest[place] == "**":
                place += 1
                reached.add(place)
        return reached

    def step(places: set[int], name: str) -> set[int]:
        after = set()
        for place in places:
            if place == len(rest) or (name.startswith(".") and not rest[place].startswith(".")):
                continue  # past the pattern, or a hidden name the part does not name
            if rest[place] == "**":
                after.add(place)
            elif fnmatch.fnmatchcase(name, rest[place]):
                after.add(place + 1)
        return closure(after)

    entered: set[tuple[Path, frozenset[int]]] = set()
    claimed: set[Path] = set()  # outside paths this listing was granted: entered again at other places of a `**`

    def visit(folder: Path, places: set[int]) -> Iterator[Path]:
        if (folder, frozenset(places)) in entered:
            return
        entered.add((folder, frozenset(places)))
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            return
        for entry in entries:
            after = step(places, entry.name)
            if not after:
                continue
            try:
                path = Path(entry.path).resolve()
            except OSError:  # a link that cannot be read
                continue
            # Outside the input, as the walk does: a link's target and each folder are claimed (once per
            # listing), the files of a claimed folder are its own.
            if not path.is_relative_to(root) and path not in claimed and (entry.is_symlink() or path.is_dir()):
                if not claim(path):
                    continue
                claimed.add(path)
            if path.is_dir() and any(place < len(rest) for place in after):
                yield from visit(path, after)
            elif path.is_file() and len(rest) in after:
                yield path

    yield from visit(root, closure({0}))


def never(target: Path) -> bool:
    """The claim of a listing that follows no link out of its input (``input_follow_links: false``)."""
    return False


def first_time() -> Callable[[Path], bool]:
    """A claim on a path outside the input that holds within one process: True the first time it is named."""
    seen: set[str] = set()

    def claim(target: Path) -> bool:
        if str(target) in seen:
            return False
        seen.add(str(target))
        return True

    return claim


def _walk(folder: Path, root: Path, claim: Callable[[Path], bool], recursive: bool = True) -> Iterator[DocumentRef]:
    """The files below ``folder`` (``recursive=False``: only those directly in it), depth first in name
    order, yielded as they are found: a folder of a million files starts yielding at once (globbing and
    sorting it first took 35 s). Inside the input ``root`` files keep their folder's resolved path, and a
    symbolic link to a file or folder inside it is left to the walk that reaches the target where it is.
    Outside it (a link's target and what lies below), each file linked to and each folder is taken only if
    ``claim`` grants it, so that a target reached twice (two links, nested targets, a loop, a link to a
    folder above the input), in any shard, is listed once; the input itself is never entered from there."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return
    inside = folder.is_relative_to(root)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subfolder = Path(entry.path)
            if recursive and (inside or (not subfolder.is_relative_to(root) and claim(subfolder))):
                yield from _walk(subfolder, root, claim)
        elif entry.is_symlink():
            target = Path(entry.path).resolve()
            if target.is_relative_to(root) or not claim(target):
                continue
            if target.is_dir():
                yield from _walk(target, root, claim)
            elif target.is_file():
                yield _local_ref(target)
        elif entry.is_file(follow_symlinks=False):
            yield _local_ref(Path(entry.path))


def _local_ref(path: Path) -> DocumentRef:
    try:
        stat = path.stat()
    except OSError:
        return DocumentRef(local_uri(path), -1)  # reported by the read stage
    return DocumentRef(local_uri(path), stat.st_size, None, f"{stat.st_size}-{stat.st_mtime_ns}")


def _list_uri_file(uri: str, storage: StorageConfig) -> Iterator[DocumentRef]:
    """A text file with one URI per line: blank lines are skipped, and so is a comment, from a ``#`` at the
    start of a line or after a space or tab to the end of the line (a ``#`` inside a name, as in
    ``inv#1.pdf``, is part of it). An S3 URI's size and version are learnt when it is read."""
    filesystem, path = filesystem_for(uri, storage)
    try:
        with filesystem.open_input_stream(path) as stream:
            lines = stream.read().decode(errors="replace").splitlines()
    except OSError as error:
        raise InputError(f"cannot read the list of documents {uri}: {error}") from None
    for line in lines:
        line = INLINE_COMMENT.sub("", line).strip()
        if line:
            yield DocumentRef(line, -1) if is_s3(line) else _local_ref(Path(line).expanduser().resolve())


def iter_shard(shard: ListingShard, storage: StorageConfig, claim: Callable[[Path], bool]) -> Iterator[DocumentRef]:
    """The documents of one shard of a listing (``claim``: see ``_walk``)."""
    if shard.whole:
        yield from iter_documents(shard.location, storage, claim)
    elif shard.bucket:
        yield from _list_s3(shard.bucket, shard.location, storage, shard.pattern, shard.recursive)
    else:
        yield from _walk(Path(shard.location), Path(shard.root), claim, shard.recursive)


def iter_documents(
    input_uri: str, storage: StorageConfig, claim: Callable[[Path], bool] = never
) -> Iterator[DocumentRef]:
    """Stream the documents of an input: folder (recursive), file, glob, s3:// prefix or glob, or a .txt list.
    A link out of a local folder is followed only where ``claim`` grants it (``first_time()``: each target
    once; by default none).

    S3 listings are paginated (1000 keys a request) and yielded as they arrive."""
    if input_uri.endswith(URI_LIST_SUFFIX) and not any(char in input_uri for char in GLOB_CHARS):
        yield from _list_uri_file(input_uri, storage)
    elif is_s3(input_uri):
        bucket, key = split_s3(input_uri)
        prefix, pattern = _s3_pattern(key)
        yield from _list_s3(bucket, prefix, storage, pattern)
    else:
        yield from _list_local(input_uri, claim)


def check_input(input_uri: str, storage: StorageConfig) -> None:
    """Before any work: the input's bucket is reachable and the input holds at least one file."""
    if is_s3(input_uri):
        check_bucket(input_uri, storage)
    if next(iter_documents(input_uri, storage), None) is None:
        raise InputError(f"no files found at input {input_uri}")
