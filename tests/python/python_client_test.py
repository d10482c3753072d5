#!/usr/bin/python3
"""An independent client: Python stubs generated from proto/ with Debian's grpc-tools, calling a real deltaserve.

Run by ctest as: python_client_test.py --deltaserve BIN --source DIR [--model_dir DIR]
Skips (exit 0 with a message) when the converted model or grpc_tools is missing.
"""
import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

ARGS = None


def generate_stubs(source, out):
    """Generates Python stubs of deltaserve.v1 and of the standard health API.

    health.proto is copied under ds_health/ first: generated modules are named after the file's path, and a
    package named `grpc` would shadow grpcio itself. The proto package (the wire name) stays grpc.health.v1.
    """
    from grpc_tools import protoc
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    health_root = os.path.join(out, "_protos")
    os.makedirs(os.path.join(health_root, "ds_health"))
    shutil.copy("/usr/share/grpc-proto/grpc/health/v1/health.proto",
                os.path.join(health_root, "ds_health", "health.proto"))
    shutil.copy("/usr/share/grpc-proto/grpc/reflection/v1alpha/reflection.proto",
                os.path.join(health_root, "ds_health", "reflection.proto"))
    for root, proto in ((os.path.join(source, "proto"), "deltaserve/v1/inference.proto"),
                        (health_root, "ds_health/health.proto"),
                        (health_root, "ds_health/reflection.proto")):
        rc = protoc.main(["protoc", f"-I{root}", f"-I{include}", f"--python_out={out}",
                          f"--grpc_python_out={out}", os.path.join(root, proto)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    for d in ("deltaserve", "deltaserve/v1", "ds_health"):
        open(os.path.join(out, d, "__init__.py"), "a").close()


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="dspy.")
        stubs = os.path.join(cls.tmp, "stubs")
        os.makedirs(stubs)
        generate_stubs(ARGS.source, stubs)
        sys.path.insert(0, stubs)
        from deltaserve.v1 import inference_pb2, inference_pb2_grpc
        from ds_health import health_pb2, health_pb2_grpc, reflection_pb2, reflection_pb2_grpc
        cls.reflection_pb2, cls.reflection_pb2_grpc = reflection_pb2, reflection_pb2_grpc
        cls.pb, cls.pb_grpc = inference_pb2, inference_pb2_grpc
        cls.health_pb2, cls.health_pb2_grpc = health_pb2, health_pb2_grpc
        import grpc
        cls.grpc = grpc

        port_file = os.path.join(cls.tmp, "ports")
        cls.log = open(os.path.join(cls.tmp, "log"), "w")
        cls.proc = subprocess.Popen([ARGS.deltaserve, "--model_dir=" + ARGS.model_dir, "--listen=127.0.0.1:0",
                                     "--metrics_listen=127.0.0.1:0", "--port_file=" + port_file,
                                     "--max_inputs_per_request=32"],
                                    stdout=cls.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not os.path.exists(port_file):
            if cls.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("deltaserve did not start: " + open(os.path.join(cls.tmp, "log")).read())
            time.sleep(0.02)
        with open(port_file) as f:
            port = int(f.read().split()[0])
        cls.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(cls.channel).result(timeout=60)
        cls.stub = cls.pb_grpc.InferenceServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.proc.send_signal(signal.SIGTERM)
        cls.proc.wait(timeout=60)
        cls.log.close()

    def test_health_check_reports_serving(self):
        stub = self.health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(self.health_pb2.HealthCheckRequest(service=""), timeout=10)
        self.assertEqual(resp.status, self.health_pb2.HealthCheckResponse.SERVING)

    def test_server_reflection_lists_the_services(self):
        stub = self.reflection_pb2_grpc.ServerReflectionStub(self.channel)
        request = self.reflection_pb2.ServerReflectionRequest(list_services="")
        responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in responses[0].list_services_response.service}
        self.assertIn("deltaserve.v1.InferenceService", names)
        self.assertIn("grpc.health.v1.Health", names)

    def test_model_info_describes_use_lite(self):
        info = self.stub.GetModelInfo(self.pb.GetModelInfoRequest(), timeout=10)
        self.assertEqual(info.model.family, "use-lite")
        self.assertEqual(info.model.embedding_dim, 512)
        self.assertEqual(info.api_version, "deltaserve.v1")

    def test_embeddings_are_unit_vectors_and_similar_sentences_are_closer(self):
        texts = ["I love this movie.", "This film is wonderful.", "The stock market fell sharply today."]
        resp = self.stub.Embed(self.pb.EmbedRequest(texts=texts), timeout=30)
        vecs = [list(r.embedding.values) for r in resp.results]
        self.assertEqual(len(vecs), 3)
        for v in vecs:
            self.assertEqual(len(v), 512)
            self.assertAlmostEqual(math.sqrt(sum(x * x for x in v)), 1.0, places=4)
        cos = lambda a, b: sum(x * y for x, y in zip(a, b))
        self.assertGreater(cos(vecs[0], vecs[1]), cos(vecs[0], vecs[2]) + 0.3)

    def test_bad_input_gets_invalid_argument(self):
        with self.assertRaises(self.grpc.RpcError) as ctx:
            self.stub.Embed(self.pb.EmbedRequest(token_ids=[self.pb.TokenIds(ids=[1, -5])]), timeout=10)
        self.assertEqual(ctx.exception.code(), self.grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("out of range", ctx.exception.details())
        with self.assertRaises(self.grpc.RpcError) as ctx:
            self.stub.Embed(self.pb.EmbedRequest(texts=["x"] * 33), timeout=10)
        self.assertEqual(ctx.exception.code(), self.grpc.StatusCode.INVALID_ARGUMENT)

    def test_unknown_task_reference_is_not_found(self):
        req = self.pb.EmbedRequest(texts=["x"], task=self.pb.TaskRef(task="t", version=3))
        with self.assertRaises(self.grpc.RpcError) as ctx:
            self.stub.Embed(req, timeout=10)
        self.assertEqual(ctx.exception.code(), self.grpc.StatusCode.NOT_FOUND)
        self.assertIn("default/t has no versions", ctx.exception.details())


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--deltaserve", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--model_dir", default="")
    ARGS, rest = parser.parse_known_args()
    if not ARGS.model_dir:
        ARGS.model_dir = os.environ.get("DS_USE_LITE_DIR") or os.path.join(ARGS.source, "models", "use-lite")
    if not os.path.exists(os.path.join(ARGS.model_dir, "model.safetensors")):
        print(f"SKIPPED: no converted model in {ARGS.model_dir}; run `bash scripts/setup.sh build`")
        return 0
    try:
        import grpc  # noqa: F401
        import grpc_tools  # noqa: F401
    except ImportError as e:
        print(f"SKIPPED: {e}; apt-get install python3-grpcio python3-grpc-tools")
        return 0
    result = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2).result
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
