"""The unit tier: nothing trained, no server. The example models come with seeded initial weights here,
which is all a parser, a codec, a handler or the archiver needs (answers are checked against the same
weights run independently)."""

from __future__ import annotations

import functools

from tests.conftest import model_fixtures, untrained

net_spec, net_archive, net_dir = model_fixtures("net", functools.partial(untrained, sharpen=1.0))
digits_spec, digits_archive, digits_dir = model_fixtures("digits", untrained)
