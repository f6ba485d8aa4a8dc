"""Config resolution and validation, in-process."""
import os

from absl.testing import absltest

from jaxdissect import config as config_lib
from jaxdissect import errors
from jaxdissect import registry


class ConfigTest(absltest.TestCase):

  def test_store_paths_become_absolute_so_other_tools_find_them_anywhere(self):
    config = config_lib.get_base_config()
    resolved = config_lib.resolve_paths(config, "relative/work")
    self.assertEqual(resolved.result_dir, os.path.join(os.getcwd(), "relative/work/results"))
    self.assertTrue(os.path.isabs(resolved.activation_dir))
    self.assertEqual(config.result_dir, "<workdir>/results")  # the input is untouched

  def test_cloud_store_paths_stay_as_given(self):
    config = config_lib.get_base_config()
    config.activation_dir = "gs://bucket/acts"
    self.assertEqual(config_lib.resolve_paths(config, "/w").activation_dir, "gs://bucket/acts")

  def test_filesystem_failures_name_path_cause_and_fix(self):
    import errno  # pylint: disable=g-import-not-at-top
    cases = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
             errno.ENOTDIR: "a path component is a file, not a directory"}
    for code, cause in cases.items():
      err = errors.from_os_error("activation_dir", OSError(code, os.strerror(code),
                                                           "/data/acts/x.npy"), "saving")
      self.assertEqual(err.field, "activation_dir")
      self.assertIn(f"saving at /data/acts/x.npy failed: {cause}.", err.one_line())
      self.assertIn("a rerun resumes from what was saved", err.one_line())
    odd = errors.from_os_error("result_dir", OSError(errno.EIO, "Input/output error"), "writing")
    self.assertIn("writing at its path failed: Input/output error.", odd.one_line())

  def test_invalid_decode_limits_are_user_errors(self):
    for field in ("max_image_bytes", "max_image_pixels"):
      for value in (0, -5):
        config = config_lib.get_base_config()
        config[field] = value
        with self.assertRaisesRegex(errors.UserError, f"^{field}: must be a positive"):
          config_lib.validate(config)

  def test_negative_similarity_block_sizes_are_user_errors(self):
    for field in ("neuron_chunk_size", "concept_block_size"):
      config = config_lib.get_base_config()
      config[field] = -1
      with self.assertRaisesRegex(errors.UserError, f"^{field}: must be 0"):
        config_lib.validate(config)

  def test_activation_gather_budget_is_not_negative(self):
    for value in (-1.0, float("nan")):
      config = config_lib.get_base_config()
      config.activation_gather_max_gb = value
      with self.assertRaisesRegex(errors.UserError, "^activation_gather_max_gb: must be 0 "
                                  "or more.*--config.activation_gather_max_gb=4"):
        config_lib.validate(config)
    config = config_lib.get_base_config()
    config.activation_gather_max_gb = 0.0
    config_lib.validate(config)

  def test_trust_bootstrap_is_off_or_at_least_two(self):
    for value in (-1, 1):
      config = config_lib.get_base_config()
      config.trust_bootstrap = value
      with self.assertRaisesRegex(errors.UserError, "^trust_bootstrap: must be 0 .off. or "
                                  "at least 2.*--config.trust_bootstrap=20"):
        config_lib.validate(config)
    for value in (0, 2, 20):
      config = config_lib.get_base_config()
      config.trust_bootstrap = value
      config_lib.validate(config)

  def test_explanation_settings(self):
    for field, value, message in (("explain_concepts", -1, "must be 0 .off. or more"),
                                  ("compose_beam", -2, "must be 0 .off. or more"),
                                  ("explain_holdout", 0.0, "must lie in .0, 1."),
                                  ("explain_holdout", 1.0, "must lie in .0, 1.")):
      config = config_lib.get_base_config()
      config[field] = value
      with self.assertRaisesRegex(errors.UserError, f"^{field}: {message}.*--config"):
        config_lib.validate(config)
    config = config_lib.get_base_config()
    config.explain_concepts = 0  # off
    config_lib.validate(config)

  def test_the_demo_config_does_not_write_over_the_default_results(self):
    import importlib.util  # pylint: disable=g-import-not-at-top
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "demo.py")
    spec = importlib.util.spec_from_file_location("demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    demo = config_lib.resolve_paths(module.get_config(), "/w")
    default = config_lib.resolve_paths(config_lib.get_base_config(), "/w")
    self.assertNotEqual(demo.result_dir, default.result_dir)
    self.assertNotEqual(demo.activation_dir, default.activation_dir)

  def test_split_layers(self):
    self.assertEqual(config_lib.split_layers(" layer4, fc ,"), ["layer4", "fc"])
    self.assertEqual(config_lib.split_layers(["layer4", " "]), ["layer4"])

  def test_validate_reads_the_registry(self):
    config = config_lib.get_base_config()
    self.assertEqual(config.similarity_fn, registry.DEFAULT_SIMILARITY)
    for field, value, names in (("similarity_fn", "nope", registry.SIMILARITY_FUNCTIONS),
                                ("similarity_kernel", "cuda", registry.KERNELS),
                                ("similarity_dtype", "fp8", registry.COMPUTE_DTYPES),
                                ("pool_mode", "sum", registry.POOL_MODES)):
      bad = config_lib.get_base_config()
      bad[field] = value
      with self.assertRaises(errors.UserError) as caught:
        config_lib.validate(bad)
      self.assertEqual(caught.exception.field, field)
      for name in names:
        self.assertIn(name, caught.exception.fix)


if __name__ == "__main__":
  absltest.main()
