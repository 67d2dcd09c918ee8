#!/usr/bin/env bash
# Start Debian's Orthanc (packages orthanc, orthanc-dicomweb) with bac-node's configuration,
# its storage, index and log in DIR:
#
#   deploy/orthanc/start-orthanc.sh DIR [BACNODE_HOST [BACNODE_PORT]]
#
# DIR/orthanc.json is written from deploy/orthanc/orthanc.json (storage DIR/storage, the
# auto-routing script deploy/orthanc/autorouting.lua, bac-node's address as given,
# default 127.0.0.1:11112), then Orthanc runs in the foreground until Ctrl-C.
# Start bac-node with `--ae-title BACNODE` and destinations = ["ORTHANC@<this host>:4242"].
# ORTHANC_REMOTE_ACCESS=true lets a reverse proxy on another host (a container) reach
# Orthanc's HTTP port; keep it off when the proxy runs on this machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:?usage: $0 DIR [BACNODE_HOST [BACNODE_PORT]]}"
host="${2:-127.0.0.1}"
port="${3:-11112}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
binary="$(command -v Orthanc || echo /usr/sbin/Orthanc)"
[ -x "$binary" ] || { echo "Orthanc is not installed: sudo apt-get install orthanc orthanc-dicomweb" >&2; exit 1; }
python3 - "$here" "$dir" "$host" "$port" "${ORTHANC_REMOTE_ACCESS:-false}" <<'PY'
import json, sys
from pathlib import Path
here, directory, host, port = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
config = json.loads((here / "orthanc.json").read_text())
config["StorageDirectory"] = config["IndexDirectory"] = str(directory / "storage")
config["LuaScripts"] = [str(here / "autorouting.lua")]
config["DicomModalities"]["bacnode"].update(Host=host, Port=port)
config["RemoteAccessAllowed"] = sys.argv[5] == "true"
(directory / "orthanc.json").write_text(json.dumps(config, indent=2))
PY
echo "Orthanc: http://127.0.0.1:8042 (DICOM port 4242, AE ORTHANC); data in $dir" >&2
exec "$binary" "$dir/orthanc.json"
