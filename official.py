"""The authors' 8 released checkpoints: where they are published, their pinned SHA-256s, and the verified download.

    from official import fetch_official, authors_folder
    folder = fetch_official()     # ~/.cache/beyondparallelism/official/<commit>/, every file checked; usable as a
                                  # checkpoint folder ({H}_heads_{task}.pt, the authors' plain state_dicts)
    authors_folder()              # a folder already holding all 8 verified files, or None (never downloads)

BEYONDPARALLELISM_OFFICIAL_URL replaces the published address (a mirror, or the tests' loopback server).
"""
import hashlib
import os
from pathlib import Path

import torch.hub

from config import cache_dir

# The authors' repository at a pinned commit, and each released file's SHA-256.
OFFICIAL_REPO, OFFICIAL_COMMIT = "haitzsaezdeocariz/beyondparallelism", "0de5787e624f2cc4b274c87b93a6f6d662dee9ad"
OFFICIAL_URL = f"https://raw.githubusercontent.com/{OFFICIAL_REPO}/{OFFICIAL_COMMIT}/checkpoints"
OFFICIAL_URL_VARIABLE = "BEYONDPARALLELISM_OFFICIAL_URL"
OFFICIAL_SHA256 = {
    "1_heads_copy.pt": "301a874b10ac7e8381458f738be2748928ff67d5b69dad677d9ce47a8bc12904",
    "4_heads_copy.pt": "ded0999c457ca3605b79bded66e271623765f2b8d55841306912e6143a74cf2b",
    "8_heads_copy.pt": "d2bca84e1e59778a9b13775fab745821ef1bafc053e51bef3f3a37bb4ab6f093",
    "16_heads_copy.pt": "0de2dfa01e1a263c25e1ed28ffc6d298b86129d05b9984ff12115cd2ae5ca22c",
    "1_heads_cycle.pt": "6bf97d1c26f8c13bfdd0ea4aafbe017c806ce49ad67c9d781bb6794d452f4fd1",
    "4_heads_cycle.pt": "882680ba5e12377641482c1a82d40026e357f46eacc697e057ee530910e6a333",
    "8_heads_cycle.pt": "96ab0694ee8b1d3439423d74ea8cddfe26e8af89ad8fb51bd99d1137eee63b06",
    "16_heads_cycle.pt": "733be35e05143fac18a8c998466d85fc6730c5aef83f75a8c565a8607bfc84a2",
}
# An offline copy may sit in a folder shared/official_checkpoints beside this repo's folder (a team's shared drive):
# the seed study then shows the authors' models without a download.
SIBLING_COPY = Path(__file__).resolve().parent.parent / "shared" / "official_checkpoints"


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def official_cache_dir():
    """Where fetch_official keeps the authors' checkpoints."""
    return cache_dir() / "official" / OFFICIAL_COMMIT[:12]


def holds_release(folder):
    """Whether `folder` holds all 8 released files, each matching its pinned SHA-256."""
    return all((folder / name).is_file() and sha256_of(folder / name) == sha for name, sha in OFFICIAL_SHA256.items())


def authors_folder():
    """A folder holding the authors' 8 verified checkpoints, without fetching: the download cache, else the sibling
    copy; None when neither holds all 8."""
    return next((folder for folder in (official_cache_dir(), SIBLING_COPY) if holds_release(folder)), None)


def fetch_official(progress=True, log=print):
    """The authors' 8 released checkpoints in the user's cache, each checked against its pinned SHA-256; a verified
    cached file is not fetched again. Returns the cache folder; RuntimeError (naming the URL and the offline way)
    when a file cannot be fetched or fails its checksum, which is then not kept."""
    base = os.environ.get(OFFICIAL_URL_VARIABLE) or OFFICIAL_URL
    folder = official_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for name, expected in OFFICIAL_SHA256.items():
        path = folder / name
        if path.is_file() and sha256_of(path) == expected:
            continue
        url = f"{base.rstrip('/')}/{name}"
        log(f"fetching {url}")
        unverified = path.with_name(f".{name}.unverified")
        try:  # torch.hub writes to a temporary file of its own and moves it into place when complete
            torch.hub.download_url_to_file(url, str(unverified), progress=progress)
        except Exception as error:
            raise RuntimeError(f"could not fetch {url}: {type(error).__name__}: {error}. Offline, or behind a "
                               f"firewall? Copy the authors' {{H}}_heads_{{task}}.pt files into a folder and pass "
                               f"--ckpt-dir FOLDER instead of --official") from error
        found = sha256_of(unverified)
        if found != expected:
            unverified.unlink()
            raise RuntimeError(f"{name} from {url} failed its checksum: expected SHA-256 {expected}, found {found}; "
                               f"the file was not kept")
        os.replace(unverified, path)
    return folder
