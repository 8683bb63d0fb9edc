# Sourced by kernels/*.sh: make `fedmri.kernels` importable straight from this checkout,
# without installing fedmri, through a `fedmri` package made of one link (kernels import
# nothing of fedmri outside kernels). Sets SITE (a fresh temporary folder) and prepends it
# to PYTHONPATH.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SITE=$(mktemp -d)
mkdir -p "$SITE/fedmri" && touch "$SITE/fedmri/__init__.py"
ln -s "$REPO/kernels" "$SITE/fedmri/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
