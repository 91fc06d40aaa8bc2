"""OpenAI's files API for fine-tuning datasets: ``POST /v1/files`` (multipart ``file`` and
``purpose=fine-tune``), ``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``
and ``DELETE /v1/files/{id}``.

An upload is copied into a temporary file in the daemon's files directory (the same
filesystem as its final name), checked line by line as a dataset (``check_jsonl``: an error
names the uploaded file's name and line), fsynced and renamed to ``<file_id>.jsonl``; then the
daemon records it (``add_file``), so its bytes never cross the control socket. A file
belongs to the API key that uploaded it: another key is answered 404, as for a file that
does not exist. A file a fine-tuning job that has not ended uses cannot be deleted (409): the
job reads it again when it starts or resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from harli.datasets import (
    UPLOAD_TEMP_PREFIX,
    DatasetError,
    DatasetLimits,
    JsonlSummary,
    check_jsonl,
    upload_path,
)
from harli.http_proc.deps import HttpState, Owner, State
from harli.http_proc.errors import ApiError, bad_field
from harli.http_proc.fine_tuning_objects import public_job_id
from harli.http_proc.json_text import TextJsonRoute
from harli.http_proc.pages import check_limit, page
from harli.ipc.control import (
    AddFile,
    DeleteFile,
    FileInfo,
    FileList,
    JobList,
    ListFiles,
    ListJobs,
    ShowFile,
)
from harli.ipc.inference import ErrorCode

router = APIRouter(route_class=TextJsonRoute)

PURPOSE = "fine-tune"  # the only purpose this server keeps files for
MAX_FILES_LIMIT = 10_000  # OpenAI's default and most for GET /v1/files
_FILE_ID = re.compile(r"file-[A-Za-z0-9]{1,64}")  # fullmatch: no trailing newline
_COPY_CHUNK_BYTES = 1 << 20


def file_object(f: FileInfo) -> dict[str, Any]:
    return {"id": f.file_id, "object": "file", "bytes": f.size_bytes,
            "created_at": int(f.created_s), "filename": f.filename, "purpose": f.purpose,
            "status": "processed", "status_details": None, "expires_at": None}


def no_such_file(file_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No such File object: {file_id}", param=param, code="file_not_found")


async def owned_file(state: HttpState, owner: str, file_id: str,
                     param: str | None = None) -> FileInfo:
    """The file, if ``owner`` uploaded it; 404 otherwise (another key's file is not told
    apart from one that does not exist)."""
    if not _FILE_ID.fullmatch(file_id):
        raise no_such_file(file_id, param)
    try:
        found = await state.link.call(ShowFile(file_id=file_id), FileInfo)
    except ApiError as e:
        if e.status == 404:
            raise no_such_file(file_id, param) from None
        raise
    if found.owner != owner:
        raise no_such_file(file_id, param)
    return found


def clean_filename(name: str | None) -> str:
    """The uploaded file's base name, printable, at most 255 characters."""
    base = Path(name or "").name
    base = "".join(c if c.isprintable() else "?" for c in base)[:255]
    return base or "upload.jsonl"


def keep_upload(src: IO[bytes], filename: str, files_dir: Path,
                limits: DatasetLimits) -> tuple[str, JsonlSummary]:
    """Copy an upload to ``files_dir`` under a new file id, checked and fsynced (blocking:
    run it on a worker thread). ``DatasetError`` names ``filename`` and the line at fault;
    nothing is left behind when it fails."""
    files_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    file_id = f"file-{secrets.token_hex(12)}"
    tmp = files_dir / f"{UPLOAD_TEMP_PREFIX}{file_id}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            src.seek(0)
            shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size > limits.max_bytes:
            raise ApiError(413, f"{filename}: {size} bytes, over the limit of "
                                f"{limits.max_bytes} for a dataset "
                                f"(finetune.max_dataset_bytes)", param="file",
                           code="file_too_large")
        summary = check_jsonl(tmp, limits, shown_as=filename)
        os.rename(tmp, upload_path(files_dir, file_id))
        dir_fd = os.open(files_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
    return file_id, summary


@router.post("/v1/files")
async def create_file(request: Request, state: State, owner: Owner) -> Any:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "expected a multipart/form-data body with the fields `file` "
                            "and `purpose`", code="invalid_request")
    form = await request.form(max_files=1, max_fields=8)
    try:
        unknown = sorted(k for k in form if k not in ("file", "purpose"))
        if unknown:
            raise bad_field(unknown[0], f"Unrecognized request argument supplied: "
                                        f"{unknown[0]}")
        purpose = form.get("purpose")
        if not isinstance(purpose, str):
            raise bad_field("purpose", "Missing required parameter: 'purpose'")
        if purpose != PURPOSE:
            raise bad_field("purpose", f"Invalid value for 'purpose': {purpose!r}; this "
                                       f"server keeps files for {PURPOSE!r} only")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_field("file", "Missing required parameter: 'file' (a file part)")
        filename = clean_filename(upload.filename)
        ft = state.cfg.finetune
        limits = DatasetLimits(max_bytes=ft.max_dataset_bytes, max_line_bytes=ft.max_line_bytes,
                               max_records=ft.max_dataset_records)
        try:
            file_id, summary = await asyncio.to_thread(keep_upload, upload.file, filename,
                                                       state.cfg.files_dir, limits)
        except DatasetError as e:
            raise ApiError(400, f"Invalid file format for fine-tuning: {e}", param="file",
                           code="invalid_file_format") from None
    finally:
        await form.close()  # the parser's spooled copy
    try:
        info = await state.link.call(AddFile(
            file_id=file_id, filename=filename, purpose=purpose, owner=owner,
            records=summary.records, format=summary.format), FileInfo)
    except ApiError as e:
        # After a timeout the daemon may have recorded it: the file stays (a daemon that did
        # not record it deletes it at its next start). Otherwise it is no one's.
        if e.code != ErrorCode.TIMEOUT:
            upload_path(state.cfg.files_dir, file_id).unlink(missing_ok=True)
        raise
    return file_object(info)


@router.get("/v1/files")
async def list_files(state: State, owner: Owner, purpose: str | None = None,
                     limit: int = MAX_FILES_LIMIT, order: str = "desc",
                     after: str | None = None) -> Any:
    check_limit(limit, MAX_FILES_LIMIT)
    if order not in ("asc", "desc"):
        raise bad_field("order", f"Invalid value for 'order': {order!r}; expected 'asc' or "
                                 f"'desc'")
    files = (await state.link.call(ListFiles(owner=owner), FileList)).files
    if purpose is not None:
        files = [f for f in files if f.purpose == purpose]
    if order == "desc":
        files.reverse()
    return page(files, lambda f: f.file_id, after, limit, file_object)


@router.get("/v1/files/{file_id}")
async def retrieve_file(state: State, owner: Owner, file_id: str) -> Any:
    return file_object(await owned_file(state, owner, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(state: State, owner: Owner, file_id: str) -> Any:
    found = await owned_file(state, owner, file_id)
    if not Path(found.path).is_file():
        raise no_such_file(file_id)
    return FileResponse(found.path, media_type="application/octet-stream",
                        filename=found.filename)


@router.delete("/v1/files/{file_id}")
async def delete_file(state: State, owner: Owner, file_id: str) -> Any:
    found = await owned_file(state, owner, file_id)
    try:
        await state.link.call(DeleteFile(file_id=file_id), FileInfo)
    except ApiError as e:
        if e.status == 409:
            raise ApiError(409, f"{file_id} is used by a fine-tuning job that has not ended "
                                f"({await _users(state, owner, found.path)}); cancel it, or "
                                f"wait for it to end", param="file_id",
                           code="file_in_use") from None
        raise
    return {"id": file_id, "object": "file", "deleted": True}


async def _users(state: HttpState, owner: str, path: str) -> str:
    """The owner's jobs that have not ended and use ``path``, for the 409's message."""
    with contextlib.suppress(ApiError):
        jobs = (await state.link.call(ListJobs(owner=owner), JobList)).jobs
        ids = [public_job_id(j.job_id) for j in jobs
               if path in (j.spec.dataset, j.spec.validation_file)
               and j.status not in ("succeeded", "failed", "cancelled")]
        if ids:
            return ", ".join(ids)
    return "a job made with the harli CLI"
