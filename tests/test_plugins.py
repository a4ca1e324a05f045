"""Plugins: a module named in $LMM_ALIGN_PLUGINS registers a source the data registry then reads;
a plugin that fails to import is named."""

import collections
import sys

import ml_collections
import pytest

from lmm_align import plugins
from lmm_align.data import registry


def test_env_plugin_registers_a_source(tmp_path, monkeypatch):
  (tmp_path / "my_plugin_formats.py").write_text(
    "import collections\n"
    "from lmm_align.data import registry\n"
    "@registry.register('prompts', 'my_prompts')\n"
    "def read(data, **_):\n"
    "  return [{'id': 'a', 'question': data.question}], collections.Counter(skipped_x=2)\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setenv(plugins.ENV_VAR, " my_plugin_formats , ")
  assert plugins.names()[-1] == "my_plugin_formats"
  assert "lmm_align.shapes" in plugins.names()
  assert "my_prompts" in registry.names("prompts")
  data = ml_collections.ConfigDict({"source": "my_prompts", "question": "What is it?"})
  records, skipped = registry.read("prompts", data)
  assert records == [{"id": "a", "question": "What is it?"}]
  assert skipped == collections.Counter(skipped_x=2)
  sys.modules.pop("my_plugin_formats", None)


def test_missing_plugin_is_named(monkeypatch):
  monkeypatch.setenv(plugins.ENV_VAR, "no_such_plugin_module_xyz")
  with pytest.raises(ImportError, match=r"no_such_plugin_module_xyz.*LMM_ALIGN_PLUGINS"):
    plugins.load()
  data = ml_collections.ConfigDict({"source": "nope"})
  monkeypatch.delenv(plugins.ENV_VAR)
  with pytest.raises(ValueError, match="data.source='nope' is not a source of pairs"):
    registry.read("pairs", data)
