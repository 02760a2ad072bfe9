"""DICOMweb sources: QIDO-RS to know a study, WADO-RS to fetch it, STOW-RS for results.

`dicomweb+https://pacs.example/dicom-web/studies/<StudyUID>[/series/<SeriesUID>]`; the
service root is everything before `/studies`, or `base_url` from the configuration.
WADO-RS answers with `multipart/related; type="application/dicom"`: each part is one
instance, streamed to the cache as it arrives and stored byte for byte as the PACS sent
it, under `<SeriesUID>/<SOPInstanceUID>.dcm` (the UIDs read from the part's own header).

Instances come as the archive holds them (`transfer-syntax=*`): without it a PACS
transcodes to Explicit VR Little Endian, which silently changes compressed pixel data
and fails outright for syntaxes it cannot decode. An input that names a
`transfer_syntax` asks for that one instead; the archive converts, or says why not. A
study is staged only whole: the instances received must be as many as QIDO-RS lists,
and an answer cut off or malformed is a source error worth retrying, never a partial
study.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import AsyncIterator

import aiohttp
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from services.datacache.sources.base import (
    FileSink,
    ResultFile,
    Source,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
    http_error,
)

UID = r"[0-9]+(?:\.[0-9]+)*"
PATH = re.compile(rf"^(?P<root>.*?)/studies/(?P<study>{UID})(?:/series/(?P<series>{UID}))?/?$")
#: Instances in the archive's own transfer syntax (`*`), or in the one asked for
#: (PS3.18 8.7.3.5.2).
DICOM_PARTS = 'multipart/related; type="application/dicom"; transfer-syntax={syntax}'
#: Characters of an error answer's body kept in the reason.
REASON_CHARS = 300
#: Bytes of a part read before its header is parsed for its UIDs.
HEADER_PREFIX = 256 * 1024
CHUNK = 1 << 20


class DicomWebSource(Source):
    schemes = ("dicomweb+http", "dicomweb+https")
    converts_dicom = True
    #: The instances `version` listed, for the fetch that follows it.
    _listed: list[str] | None = None

    def _parts(self, ref: SourceRef) -> tuple[str, str, str | None]:
        match = PATH.match(ref.path)
        if match is None or not ref.netloc:
            raise SourceRefused(
                f"{ref.uri} is not a DICOMweb study or series URI "
                "(dicomweb+https://host/root/studies/<uid>[/series/<uid>])"
            )
        return match["root"], match["study"], match["series"]

    def canonical(self, ref: SourceRef) -> str:
        root, study, series = self._parts(ref)
        tail = f"/studies/{study}" + (f"/series/{series}" if series else "")
        converted = f"?transfer-syntax={ref.transfer_syntax}" if ref.transfer_syntax else ""
        return f"{ref.scheme}://{ref.netloc.lower()}{root}{tail}{converted}"

    def _root(self, ref: SourceRef) -> str:
        if self.config is not None and self.config.base_url:
            return self.config.base_url.rstrip("/")
        root, _, _ = self._parts(ref)
        return f"{ref.scheme.removeprefix('dicomweb+')}://{ref.netloc}{root}"

    async def _instances(self, ref: SourceRef) -> list[str]:
        """The SOP instance UIDs of the study (or series), from QIDO-RS: no pixels."""
        _, study, series = self._parts(ref)
        path = f"/studies/{study}" + (f"/series/{series}" if series else "") + "/instances"
        url = self._root(ref) + path
        try:
            async with self.request("GET", url, {"Accept": "application/dicom+json"}) as r:
                if r.status == 204:
                    raise SourceRefused(f"{self.canonical(ref)}: no such study in the PACS")
                if r.status >= 400:
                    raise http_error(r.status, self.canonical(ref))
                found = await r.json(content_type=None)
        except ValueError as exc:
            raise SourceRefused(f"{self.canonical(ref)}: QIDO-RS answer is not JSON") from exc
        except aiohttp.ClientError as exc:
            raise SourceUnavailable(f"{self.canonical(ref)}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise SourceUnavailable(f"{self.canonical(ref)}: timed out") from exc
        uids = sorted(item.get("00080018", {}).get("Value", [""])[0] for item in found or [])
        if not uids:
            raise SourceRefused(f"{self.canonical(ref)}: no such study in the PACS")
        return uids

    async def version(self, ref: SourceRef) -> str | None:
        """The study's (or series') SOP instance UIDs, digested: QIDO-RS, no pixels. The
        fetch that follows counts against this listing (a QIDO-RS of a large study is a
        dear query for the PACS); a retried fetch lists again."""
        uids = await self._instances(ref)
        self._listed = uids
        return f"{len(uids)}:{hashlib.sha256(chr(0).join(uids).encode()).hexdigest()[:16]}"

    async def fetch(self, ref: SourceRef, sink: FileSink) -> None:
        _, study, series = self._parts(ref)
        url = self._root(ref) + f"/studies/{study}" + (f"/series/{series}" if series else "")
        name = self.canonical(ref)
        listing, self._listed = self._listed, None
        listed = len(listing if listing is not None else await self._instances(ref))
        count = 0
        try:
            accept = DICOM_PARTS.format(syntax=ref.transfer_syntax or "*")
            async with self.request("GET", url, {"Accept": accept}) as response:
                if response.status >= 400:
                    # The archive's own words: why it cannot send (or convert) the study.
                    answer = await response.text(errors="replace")
                    reason = " ".join(answer[: REASON_CHARS * 2].split())[:REASON_CHARS]
                    raise http_error(response.status, name, reason)
                reader = aiohttp.MultipartReader(response.headers, response.content)
                while (part := await _next_part(reader)) is not None:
                    if not isinstance(part, aiohttp.BodyPartReader):
                        raise SourceRefused(f"{name}: nested multipart in a WADO-RS answer")
                    prefix = await _read_prefix(part)
                    await sink.put(_instance_path(prefix, count), _rest(prefix, part))
                    count += 1
        except aiohttp.ClientError as exc:
            raise SourceUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise SourceUnavailable(f"{name}: timed out") from exc
        except _CutShort as exc:
            raise SourceUnavailable(
                f"{name}: the WADO-RS answer broke off after {count} of {listed} instances ({exc})"
            ) from exc
        if count == 0:
            raise SourceRefused(f"{name}: the PACS returned no instances")
        if count != listed:
            raise SourceUnavailable(
                f"{name}: the PACS returned {count} of the {listed} instances it lists"
            )

    async def upload(self, ref: SourceRef, files: list[ResultFile]) -> str:
        """STOW-RS of the result files that are DICOM; anything else is refused."""
        bodies = []
        for item in files:
            data = b"".join([chunk async for chunk in item.open()])
            if data[128:132] != b"DICM":
                raise SourceRefused(f"result {item.path} is not a DICOM file; STOW-RS takes DICOM")
            bodies.append(data)
        with aiohttp.MultipartWriter("related", boundary=None) as writer:
            for data in bodies:
                writer.append(data, {"Content-Type": "application/dicom"})
        writer.headers["Content-Type"] = (
            f'multipart/related; type="application/dicom"; boundary={writer.boundary}'
        )
        url = self._root(ref) + "/studies"
        try:
            async with self.request(
                "POST",
                url,
                {
                    "Content-Type": writer.headers["Content-Type"],
                    "Accept": "application/dicom+json",
                },
                writer,
            ) as response:
                if response.status >= 300:
                    raise http_error(response.status, url)
        except aiohttp.ClientError as exc:
            raise SourceUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
        return f"stored {len(bodies)} instances at {url} (STOW-RS)"


class _CutShort(Exception):
    """The multipart answer ended, or broke, before its closing boundary."""


async def _next_part(
    reader: aiohttp.MultipartReader,
) -> aiohttp.MultipartReader | aiohttp.BodyPartReader | None:
    try:
        return await reader.next()
    except ValueError as exc:  # aiohttp's word for a boundary that never came
        raise _CutShort(str(exc)) from exc


async def _chunk(part: aiohttp.BodyPartReader) -> bytes:
    try:
        return bytes(await part.read_chunk(CHUNK))
    except ValueError as exc:  # "did not read all the data or it is malformed"
        raise _CutShort(str(exc)) from exc


async def _read_prefix(part: aiohttp.BodyPartReader) -> bytes:
    prefix = b""
    while len(prefix) < HEADER_PREFIX:
        chunk = await _chunk(part)
        if not chunk:
            break
        prefix += chunk
    return prefix


async def _rest(prefix: bytes, part: aiohttp.BodyPartReader) -> AsyncIterator[bytes]:
    yield prefix
    while chunk := await _chunk(part):
        yield chunk


def _instance_path(prefix: bytes, index: int) -> str:
    """`<SeriesUID>/<SOPInstanceUID>.dcm` from the instance's header; by position if the
    header does not fit the prefix."""
    try:
        ds = dcmread(io.BytesIO(prefix), stop_before_pixels=True, defer_size=1024)
        series, sop = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        if re.fullmatch(UID, series) and re.fullmatch(UID, sop):
            return f"{series}/{sop}.dcm"
    except (InvalidDicomError, AttributeError, EOFError, ValueError, OSError):
        pass
    return f"instance-{index:06d}.dcm"
