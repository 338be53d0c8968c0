#!/usr/bin/env bash
# `make demo`: a guided tour on throwaway data. Everything stays under one temp directory.
set -euo pipefail
DEMO=$(mktemp -d /tmp/tessera-demo.XXXXXX)
export TESSERA_HOME=$DEMO/home
MOTO_PID=""
cleanup() {
  for m in "$DEMO"/mnt*; do [ -d "$m" ] && tessera umount "$m" >/dev/null 2>&1 || true; done
  [ -n "$MOTO_PID" ] && kill -9 "$MOTO_PID" 2>/dev/null || true
  rm -rf "$DEMO"
}
trap cleanup EXIT
# Colours only on a terminal (and not with NO_COLOR set): a pipe or a log file gets plain text.
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then BOLD=$'\033[1;34m' DIM=$'\033[2m' OFF=$'\033[0m'; else BOLD="" DIM="" OFF=""; fi
# Print a command so it can be copied and pasted: words that need quotes get them.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:@=+,%-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi
  done
  printf '%s' "${out[*]}"
}
say() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$OFF"; }
run() { printf '%s$ %s%s\n' "$DIM" "$(quote "$@")" "$OFF"; "$@"; }

say "1. A dataset: 300 small 'images' and a label file"
python3 - "$DEMO/data" <<'PY'
import os, random, sys
root = sys.argv[1]
rng = random.Random(0)
for split, n in (("train", 240), ("val", 60)):
    os.makedirs(f"{root}/{split}", exist_ok=True)
    for i in range(n):
        with open(f"{root}/{split}/{i:04d}.jpg", "wb") as f:
            f.write(rng.randbytes(rng.randint(20_000, 80_000)))
with open(f"{root}/labels.csv", "w") as f:
    f.write("file,label\n" + "".join(f"train/{i:04d}.jpg,{i % 10}\n" for i in range(240)))
PY
run tessera commit pets "$DEMO/data" -m "first cut" --meta '{"source": "demo"}'
V1=$(tessera log pets --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["hash"])')
run tessera log pets
run tessera ls "pets@${V1:0:8}" | head -5

say "2. Change a few files: only the changes are stored"
echo "train/0000.jpg,7" >> "$DEMO/data/labels.csv"
head -c 50000 /dev/urandom > "$DEMO/data/val/extra.jpg"
run tessera status "$DEMO/data"   # what changed since the commit (the stat cache: no file re-read)
run tessera commit pets "$DEMO/data" -m "relabel, one more val image" --stats
run tessera diff "pets@${V1:0:8}" pets
run tessera tag "pets@${V1:0:8}" v1
run tessera commit pets "$DEMO/data"   # unchanged: reports the existing version, reads nothing
run tessera checkout pets:v1 "$DEMO/copy"   # materialize v1 ...
run tessera checkout pets "$DEMO/copy"      # ... then move it to the newest version: writes only the 2 changed files
run tessera log --oneline
run tessera stats

say "3. Mount a version read-only and train on it with an unmodified PyTorch DataLoader"
mkdir -p "$DEMO/mnt"
run tessera mount pets:v1 "$DEMO/mnt"
run tessera mounts
python3 - "$DEMO/mnt" <<'PY'
import os, sys, hashlib
root = sys.argv[1]
import warnings
warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on a 2-core box
try:
    import torch
    from torch.utils.data import DataLoader, Dataset
except ImportError:
    print("(torch not installed: reading with plain Python instead)")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    print(f"read {sum(len(open(p, 'rb').read()) for p in files)} bytes from {len(files)} files")
    sys.exit(0)

class Images(Dataset):
    def __init__(self, root):
        self.paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs)
    def __len__(self):
        return len(self.paths)
    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            data = f.read()
        return torch.tensor(len(data)), hashlib.sha256(data).hexdigest()

loader = DataLoader(Images(root), batch_size=32, num_workers=4)
n = total = 0
for sizes, _ in loader:
    n += len(sizes)
    total += int(sizes.sum())
print(f"DataLoader(num_workers=4) read {n} samples, {total / 1e6:.1f} MB from the mount")
PY
run getfattr -n user.tessera.sha256 "$DEMO/mnt/labels.csv" 2>/dev/null || python3 -c "import os,sys; print(os.getxattr(sys.argv[1], 'user.tessera.sha256').decode())" "$DEMO/mnt/labels.csv"
run tessera umount "$DEMO/mnt"

say "4. Share through S3 (a local moto server stands in for the bucket)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
MOTO_PID=$!
disown "$MOTO_PID"   # killed in cleanup; no "Killed" notice from the shell
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1
for _ in $(seq 50); do python3 -c "import urllib.request,os; urllib.request.urlopen(os.environ['AWS_ENDPOINT_URL'])" 2>/dev/null && break; sleep 0.2; done
python3 -c "import boto3; boto3.client('s3').create_bucket(Bucket='demo-bucket')"
run tessera remote add origin s3://demo-bucket/datasets
run tessera push pets
run tessera push pets   # nothing left to upload
say "   ...and on a 'fresh machine' (a new, empty home): browse and mount straight from S3"
export TESSERA_HOME=$DEMO/home2
run tessera remote add origin s3://demo-bucket/datasets
run tessera datasets --remote origin
run tessera log pets
mkdir -p "$DEMO/mnt2"
run tessera mount "pets@${V1:0:8}" "$DEMO/mnt2"
run ls "$DEMO/mnt2"
run tessera verify "pets@${V1:0:8}" "$DEMO/mnt2"
run tessera umount "$DEMO/mnt2"
export TESSERA_HOME=$DEMO/home

say "5. Capture a training run: outputs snapshotted every second and at exit, with lineage"
mkdir -p "$DEMO/ckpt"
cat > "$DEMO/train.py" <<'PY'
import os, sys, time
out = sys.argv[1]
for epoch in range(3):
    with open(os.path.join(out, "model.ckpt"), "wb") as f:  # rewritten every epoch
        f.write(os.urandom(100_000))
    with open(os.path.join(out, "log.txt"), "a") as f:
        f.write(f"epoch {epoch} done\n")
    time.sleep(1.1)
print("training done")
PY
run tessera run --capture "$DEMO/ckpt:run-1" --every 1 -- python3 "$DEMO/train.py" "$DEMO/ckpt"
run tessera log run-1
run tessera show run-1

say "6. No mount needed: tessera:// for pandas (fsspec), and the data pinned next to the code"
mkdir -p "$DEMO/project"
(cd "$DEMO/project" && run tessera use pets:v1)   # writes ./tessera.lock
(cd "$DEMO/project" && python3 - <<'PY'
import pandas as pd
df = pd.read_csv("tessera://pets/labels.csv")   # the version tessera.lock pins, read without a mount
print(f"pandas read {len(df)} labels of the pinned version")
PY
)

say "7. Forget what is no longer needed, and reclaim the space"
run tessera forget run-1 --keep-last 1 --dry-run
run tessera forget run-1 --keep-last 1
run tessera gc

say "8. Integrity: fsck proves every chunk and every version"
run tessera fsck
say "Done. (Everything lived in $DEMO, now removed.)"
