"""Pinned resources against a local HTTP server on 127.0.0.1 (never the internet):
good, corrupt, missing and broken-off downloads, user-supplied copies, offline mode."""
import hashlib
import http.server
import os
import threading
from unittest import mock

from absl.testing import absltest

from jaxdissect import errors
from jaxdissect import resources

GOOD = b"the\nof\nand\n" * 5000
CORRUPT = b"the\nof\nand\n" * 4999 + b"xyz\n"


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `files`; /flaky sends half its body and hangs up the first time; /corrupt
  serves other bytes than the pin until `heal` is set. Honours Range requests."""
  files = {}
  requests = []
  flaky_failures = [1]
  corrupt_until_heal = [True]

  def log_message(self, *args):  # keep the test output clean
    del args

  def do_GET(self):  # noqa: N802 (http.server's name)
    self.requests.append((self.path, self.headers.get("Range")))
    body = self.files.get(self.path)
    if self.path == "/corrupt" and not self.corrupt_until_heal[0]:
      body = GOOD
    if body is None:
      self.send_error(404)
      return
    start = 0
    if self.headers.get("Range"):
      start = int(self.headers["Range"].split("=")[1].split("-")[0])
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
    else:
      self.send_response(200)
    self.send_header("Content-Length", str(len(body) - start))
    self.end_headers()
    if self.path == "/flaky" and self.flaky_failures[0] > 0:
      self.flaky_failures[0] -= 1
      self.wfile.write(body[start:start + (len(body) - start) // 2])
      self.wfile.flush()
      self.connection.close()
      return
    self.wfile.write(body[start:])


class ResourcesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    _Handler.files = {"/good": GOOD, "/flaky": GOOD, "/corrupt": CORRUPT}
    cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    cls.base = f"http://127.0.0.1:{cls.server.server_address[1]}"
    threading.Thread(target=cls.server.serve_forever, daemon=True).start()

  @classmethod
  def tearDownClass(cls):
    cls.server.shutdown()
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.cache = self.create_tempdir().full_path
    self.enter_context(mock.patch.dict(os.environ, {"JAXDISSECT_CACHE": self.cache,
                                                    "JAXDISSECT_OFFLINE": "",
                                                    "CLIP_DISSECT_DATA": ""}))
    _Handler.requests.clear()
    self.sha = hashlib.sha256(GOOD).hexdigest()

  def _resource(self, path: str) -> resources.Resource:
    return resources.Resource("clip_dissect:test", self.base + path, self.sha, "test.txt",
                              "CLIP_DISSECT_DATA", "a test word list")

  def _use(self, resource):
    return mock.patch.dict(resources.RESOURCES, {resource.name: resource})

  def test_good_download_is_cached_and_not_fetched_again(self):
    resource = self._resource("/good")
    with self._use(resource):
      path = resources.local_path(resource.name, "concept_set")
      self.assertEqual(path, os.path.join(self.cache, "clip_dissect", "test.txt"))
      with open(path, "rb") as f:
        self.assertEqual(f.read(), GOOD)
      self.assertFalse(os.path.exists(path + ".partial"))
      resources.local_path(resource.name, "concept_set")
    self.assertLen(_Handler.requests, 1)

  def test_broken_off_download_resumes_with_a_range_request(self):
    _Handler.flaky_failures[0] = 1
    resource = self._resource("/flaky")
    with self._use(resource):
      path = resources.local_path(resource.name, "concept_set")
    with open(path, "rb") as f:
      self.assertEqual(f.read(), GOOD)
    self.assertLen(_Handler.requests, 2)
    self.assertIsNone(_Handler.requests[0][1])
    self.assertEqual(_Handler.requests[1][1], f"bytes={len(GOOD) // 2}-")

  def test_corrupt_download_is_refused_then_fetched_again(self):
    _Handler.corrupt_until_heal[0] = True
    resource = self._resource("/corrupt")
    with self._use(resource), self.assertRaises(errors.UserError) as caught:
      resources.local_path(resource.name, "concept_set")
    message = caught.exception.one_line()
    self.assertIn("sha256", message)
    self.assertFalse(os.path.exists(resource.cache_path))
    self.assertFalse(os.path.exists(resource.cache_path + ".partial"))
    # Refused downloads were retried; once the server is healed the next run succeeds.
    self.assertGreater(len(_Handler.requests), 1)
    _Handler.corrupt_until_heal[0] = False
    with self._use(resource):
      self.assertEqual(resources.local_path(resource.name, "concept_set"),
                       resource.cache_path)

  def test_missing_resource_is_one_line_naming_url_and_place(self):
    resource = self._resource("/nowhere")
    with self._use(resource), self.assertRaises(errors.UserError) as caught:
      resources.local_path(resource.name, "concept_set")
    line = caught.exception.one_line()
    self.assertNotIn("\n", line)
    for part in ("concept_set:", "HTTP 404", resource.url, resource.cache_path,
                 "CLIP_DISSECT_DATA", "Fix:"):
      self.assertIn(part, line)
    self.assertLen(_Handler.requests, 1)  # a 404 is final

  def test_offline_mode_never_downloads(self):
    resource = self._resource("/good")
    with self._use(resource), mock.patch.dict(os.environ, {"JAXDISSECT_OFFLINE": "1"}):
      with self.assertRaisesRegex(errors.UserError, "JAXDISSECT_OFFLINE"):
        resources.local_path(resource.name, "concept_set")
    self.assertEmpty(_Handler.requests)

  def test_user_copy_is_used_as_given_with_a_warning_on_another_digest(self):
    resource = self._resource("/good")
    directory = self.create_tempdir()
    directory.create_file("test.txt", "my own words\n")
    with self._use(resource), mock.patch.dict(
        os.environ, {"CLIP_DISSECT_DATA": directory.full_path}):
      with self.assertLogs(level="WARNING") as logs:
        path = resources.local_path(resource.name, "concept_set")
    self.assertEqual(path, os.path.join(directory.full_path, "test.txt"))
    self.assertIn("used as given", "\n".join(logs.output))
    self.assertEmpty(_Handler.requests)
    # A copy with the pinned digest raises no warning; a file variable works too.
    exact = directory.create_file("exact.txt", GOOD.decode())
    with self._use(resource), mock.patch.dict(os.environ,
                                              {"CLIP_DISSECT_DATA": exact.full_path}):
      with mock.patch.object(resources.logging, "warning") as warning:
        self.assertEqual(resources.local_path(resource.name, "x"), exact.full_path)
      warning.assert_not_called()

  def test_fetch_required_names_every_missing_field(self):
    config = {"target_model": "clip_dissect:a", "concept_set": "clip_dissect:b"}
    a = resources.Resource("clip_dissect:a", self.base + "/no-a", self.sha, "a.txt", "",
                           "file a")
    b = resources.Resource("clip_dissect:b", self.base + "/no-b", self.sha, "b.txt", "",
                           "file b")
    with mock.patch.dict(resources.RESOURCES, {a.name: a, b.name: b}):
      with self.assertRaises(errors.UserError) as caught:
        resources.fetch_required(config, ("target_model", "concept_set"))
    line = caught.exception.one_line()
    self.assertTrue(line.startswith("target_model:"), line)
    self.assertIn("Also missing: concept_set", line)
    self.assertIn(b.url, line)

  def test_pins_are_well_formed_and_name_the_authors_commit(self):
    for name, resource in resources.RESOURCES.items():
      self.assertLen(resource.sha256, 64, name)
      int(resource.sha256, 16)
      self.assertTrue(resource.url.startswith("https://"), name)
      if name.startswith("clip_dissect:"):
        self.assertIn(resources.CLIP_DISSECT_COMMIT, resource.url)
    with self.assertRaisesRegex(errors.UserError, "unknown resource"):
      resources.lookup("clip_dissect:nothing", "concept_set")


if __name__ == "__main__":
  absltest.main()
