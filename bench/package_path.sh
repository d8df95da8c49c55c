# Sourced by bench/gpu_suite.sh from the repository root: makes this checkout the `wurstfabrik` that `python` imports,
# for the bench scripts and the Ray workers they start (both read PYTHONPATH).
#
# The checkout's root is the package (it holds the package's __init__.py), so where it is not the installed one
# (the GPU machines run a copy of the working tree, installed nowhere) a link named wurstfabrik to it goes first on
# PYTHONPATH. The root itself goes on PYTHONPATH too, for `bench.*`.
if ! python -c 'import pathlib, sys, wurstfabrik
sys.exit(pathlib.Path(wurstfabrik.__file__).resolve() != pathlib.Path("__init__.py").resolve())' 2>/dev/null; then
    wurstfabrik_link_dir=$(mktemp -d)
    ln -s "$PWD" "$wurstfabrik_link_dir/wurstfabrik"
    export PYTHONPATH="$wurstfabrik_link_dir${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
