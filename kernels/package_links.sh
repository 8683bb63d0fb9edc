# Sourced by kernels/*.sh: make `fedmri.kernels` (and fedmri.common) importable straight from
# this checkout, without installing fedmri, through a `fedmri` package made of links.
# Sets SITE (a fresh temporary folder) and prepends it to PYTHONPATH.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SITE=$(mktemp -d)
mkdir -p "$SITE/fedmri" && touch "$SITE/fedmri/__init__.py"
for room in kernels common; do ln -s "$REPO/$room" "$SITE/fedmri/$room"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
