"""Reading the data formats and writing outputs atomically (temp file + rename)."""
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .cli import UserError


def read_json(path):
    """Load a JSON file, turning a missing or malformed file into a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return loads_clean(f.read())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


# JSON may spell a lone UTF-16 surrogate ("\ud800"), which no UTF-8 file, terminal or page can
# hold: every text read from JSON (files, server replies) goes through clean_surrogates.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads_clean(text):
    """json.loads, with lone surrogates replaced (the walk only when the text spells one)."""
    data = json.loads(text)
    return clean_surrogates(data) if SURROGATE_ESCAPE.search(text) else data


def clean_text(text):
    """`text` with surrogate pairs joined and lone surrogates replaced by U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def clean_surrogates(value):
    """clean_text on every string (keys too) of a JSON value."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {clean_surrogates(k): clean_surrogates(v) for k, v in value.items()}
    return value


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Large data is written in pieces of this size. One write() of 80 MB (scoring 200,000 samples)
# took ~0.19 s in most runs and 0.02 s in the others on our (virtual) machines; in pieces of
# 1 MB or less, 0.02 s every time. Likely cause: a large write is cached in large folios, taken
# from high-order free memory that the hypervisor has reclaimed and has to back again.
WRITE_PIECE = 1 << 18


def remove_dead_temps(path):
    """The temp files a killed writer of `path` left (.NAME.PID-XXXX.tmp, PID no longer running)."""
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{glob_escape(prefix)}*-*.tmp"):
        pid = tmp.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def glob_escape(text):
    return re.sub(r"([*?\[])", r"[\1]", text)


def atomic_write_bytes(path, data):
    """Write bytes so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            view = memoryview(data)
            for start in range(0, len(view), WRITE_PIECE):
                f.write(view[start:start + WRITE_PIECE])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)   # name the file in the one-line message (disk full: cli.run_main)
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent=2):
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


# The file every folder output holds: the stage wrote this folder, so the stage may replace it. A
# folder without it (the user's images, the project root, `results/`) is never deleted.
MARKER = ".stage-output"
MARKER_TEXT = "This folder is written whole by a stage of the pipeline: the next run replaces it.\n"


def _aside(path):
    """Where the old folder waits while the new one is moved in (a fixed name: a re-run finds it)."""
    return path.parent / f".{path.name}.replaced"


def _building_prefix(path):
    return f".{path.name}.building-"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(path):
    """Finish or undo a replace that was interrupted (Ctrl-C, SIGKILL, power loss), and remove the
    temp folders of runs that died: the old folder is back, or the new one is in place, never neither."""
    path = Path(path)
    aside = _aside(path)
    if aside.exists():
        if path.exists():
            shutil.rmtree(aside)           # the new folder was moved in: finish deleting the old one
        else:
            os.replace(aside, path)        # killed between the two moves: the old folder comes back
    if path.parent.is_dir():
        for tmp in path.parent.glob(glob_escape(_building_prefix(path)) + "*"):
            pid = tmp.name[len(_building_prefix(path)):].split(".", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)) and (tmp / MARKER).is_file():
                shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(path, inputs=()):
    """A one-line UserError unless `path` is a folder this stage may replace: absent, empty, or
    written by a stage (it holds MARKER), and neither an input nor a folder holding an input."""
    path = Path(path)
    where = path.resolve()
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise UserError(f"{path}: the output folder holds the project itself; name a folder of its own")
    for item in inputs:
        item = Path(item).resolve()
        if item == where or where in item.parents:
            raise UserError(f"{path}: the output folder holds an input ({item}); name another output folder")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"{path}: exists and is not a folder; the stage writes a folder there (move it away)")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise UserError(f"{path}: the folder holds files the stage did not write (no {MARKER}); the stage "
                        "replaces its output folder whole, so it leaves this one alone: name another "
                        "folder, or delete this one yourself")


@contextmanager
def atomic_dir(path, inputs=()):
    """Yield a temp folder beside `path`; on success it replaces `path`, on error it is removed.

    Only a folder a stage wrote is ever replaced (check_replaceable). The replace is recoverable at
    every instant: the old folder is moved aside, the new one moved in, then the old one deleted;
    the next run finishes or undoes an interrupted replace (recover_dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    check_replaceable(path, inputs)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{_building_prefix(path)}{os.getpid()}."))
    try:
        (tmp / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        check_replaceable(path, inputs)    # still ours (nothing else wrote there meanwhile)
        aside = _aside(path)
        if path.exists():
            os.replace(path, aside)
        os.replace(tmp, path)
        if aside.exists():
            shutil.rmtree(aside)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists() and _aside(path).exists():   # Ctrl-C between the two moves: the old one back
            os.replace(_aside(path), path)


def read_split(path):
    """Read a split file [{"image_path", "ocr_text"}], checking its shape."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of {{image_path, ocr_text}} rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i}: expected an object")
        for field in ("image_path", "ocr_text"):
            if not isinstance(row.get(field), str):
                raise UserError(f"{path}: row {i}: field '{field}' missing or not a string")
    return rows
