"""Exports a checkpoint for deployment as a TF SavedModel, a TFLite model and an ONNX model.

    python -m fermsca.export --checkpoint DIR --output OUTDIR [--formats savedmodel,tflite,onnx]
        [--input_dtype float32|uint8]

Every format computes `inference.probabilities` without TTA: raw grayscale faces [N, 48, 48, 1] with
pixel values 0-255 (float32 or uint8) -> softmax probabilities [N, K]. The per-image
standardisation of training (`augment.preprocess`) is inside the exported graph.

The route: JAX -> `jax2tf` (StableHLO in an XlaCallModule op, lowered for CPU and CUDA) -> SavedModel
-> `tf.lite.TFLiteConverter` (which turns the StableHLO into TFLite builtin ops) -> model.tflite ->
`tf2onnx` -> model.onnx. ONNX goes through TFLite because tf2onnx cannot read XlaCallModule ops;
jax2onnx would convert directly but requires orbax-checkpoint<0.11.37, older than ours.

OUTDIR/
    savedmodel/    signature "serving_default": images -> {"probabilities"}
    model.tflite   signature "serving_default": images -> probabilities
    model.onnx     input "images", output "probabilities", batch dimension "batch"
    labels.txt     the class names, one a line, in output order
    export.json    input spec, class names, checkpoint, and each format's largest absolute
                   difference from JAX on check inputs (`check_inputs`)

Needs the [export] extra: tf2onnx, onnx, onnxruntime and ai-edge-litert.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np

from fermsca import cli, inference

FORMATS = ("savedmodel", "tflite", "onnx")
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
SIGNATURE = "serving_default"
TOLERANCE = 1e-4  # float32 probabilities: largest absolute difference from JAX
SIZE = 48


def _tf():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # conversion runs on the CPU; accelerators stay JAX's
    return tf


def check_inputs(num: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 [num, 48, 48, 1]: uniform noise, plus a flat image (zero spread) and a gradient."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, SIZE, SIZE, 1), dtype=np.uint8)
    images[0] = 128
    images[1, :, :, 0] = np.linspace(0, 255, SIZE).astype(np.uint8)[None, :]
    return images


def _float32(loaded: inference.LoadedModel) -> inference.LoadedModel:
    """The model computing in float32 on XLA's convolutions, whatever precision and conv_impl it was
    trained with."""
    # jax2tf cannot lower the oneDNN custom call: export always runs XLA's convolutions.
    return loaded.rebuild(conv_impl="xla", dtype="float32")


def jax_probabilities(loaded: inference.LoadedModel, images: np.ndarray) -> np.ndarray:
    """The reference: `inference.probabilities` in float32 without TTA, as NumPy."""
    fn = jax.jit(functools.partial(inference.probabilities, model=_float32(loaded).model))
    return np.asarray(fn(loaded.variables, images), np.float32)


def export_savedmodel(loaded: inference.LoadedModel, directory: str,
                      input_dtype: str = "float32") -> str:
    """Writes a SavedModel whose signature takes raw pixels [None, 48, 48, 1] of `input_dtype`.

    The model computes in float32. The weights are TF variables (not constants folded into the
    graph), as jax2tf recommends.
    """
    from jax.experimental import jax2tf

    tf = _tf()
    serve_jax = functools.partial(inference.probabilities, model=_float32(loaded).model)
    serve_tf = jax2tf.convert(serve_jax, polymorphic_shapes=[None, f"(b, {SIZE}, {SIZE}, 1)"],
                              with_gradient=False, native_serialization_platforms=("cpu", "cuda"))
    module = tf.Module()
    module.variables_tree = tf.nest.map_structure(
        lambda a: tf.Variable(a, trainable=False), loaded.variables)
    spec = tf.TensorSpec([None, SIZE, SIZE, 1], tf.dtypes.as_dtype(input_dtype), name=INPUT_NAME)

    @tf.function(autograph=False, input_signature=[spec])
    def serve(images):
        return {OUTPUT_NAME: serve_tf(module.variables_tree, images)}

    module.serve = serve
    shutil.rmtree(directory, ignore_errors=True)
    tf.saved_model.save(module, directory, signatures={SIGNATURE: serve.get_concrete_function()})
    return directory


def export_tflite(savedmodel_dir: str, path: str) -> str:
    """Converts the SavedModel to a float32 TFLite flatbuffer (builtin ops only)."""
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_saved_model(savedmodel_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        flatbuffer = converter.convert()
    except Exception as e:
        if "dynamic_gather" in str(e):
            raise RuntimeError(
                "TFLite cannot convert a gather over the dynamic batch dimension. NumPy-style "
                "indexing (x[:, a:b]) of an array whose batch size is symbolic lowers to a "
                "gather; slice the model's arrays with jax.lax.slice / lax.slice_in_dim "
                f"instead. Converter error: {str(e)[:500]}") from e
        raise
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return path


def export_onnx(tflite_path: str, path: str, class_names: Sequence[str],
                opset: int | None = None) -> str:
    """Converts the TFLite model to ONNX with tf2onnx; names the input, output and batch dimension."""
    import onnx
    import tf2onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf2onnx reads TFLite through the deprecated interpreter
        model_proto, _ = tf2onnx.convert.from_tflite(tflite_path, opset=opset)
    graph = model_proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise RuntimeError(f"{tflite_path}: expected one input and one output, got "
                           f"{[i.name for i in graph.input]} -> {[o.name for o in graph.output]}")
    _rename_value(graph, graph.input[0].name, INPUT_NAME)
    _rename_value(graph, graph.output[0].name, OUTPUT_NAME)
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.helper.set_model_props(model_proto, {"class_names": json.dumps(list(class_names))})
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, path)
    return path


def _rename_value(graph, old: str, new: str) -> None:
    """Renames a tensor of an ONNX graph everywhere it is produced or used."""
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


# ----------------------------------------------------------------------------------------------
# Runners: each exported format on a batch of raw faces, for checks and for users.


def run_savedmodel(directory: str, images: np.ndarray) -> np.ndarray:
    tf = _tf()
    serve = tf.saved_model.load(directory).signatures[SIGNATURE]
    dtype = serve.structured_input_signature[1][INPUT_NAME].dtype
    return serve(**{INPUT_NAME: tf.constant(images, dtype=dtype)})[OUTPUT_NAME].numpy()


def _tflite_interpreter(path: str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older setups: TensorFlow's own, deprecated, interpreter
        Interpreter = _tf().lite.Interpreter  # noqa: N806
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Interpreter(model_path=path)


def run_tflite(path: str, images: np.ndarray) -> np.ndarray:
    interpreter = _tflite_interpreter(path)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.asarray(images, inp["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def run_onnx(path: str, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    dtype = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}[session.get_inputs()[0].type]
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(images, dtype)})[0]


RUNNERS: dict[str, Callable[[str, np.ndarray], np.ndarray]] = {
    "savedmodel": run_savedmodel, "tflite": run_tflite, "onnx": run_onnx}
FILES = {"savedmodel": "savedmodel", "tflite": "model.tflite", "onnx": "model.onnx"}


def export(checkpoint_path: str, outdir: str, formats: Sequence[str] = FORMATS, *,
           input_dtype: str = "float32", check: bool = True) -> dict:
    """Exports a checkpoint in `formats` to `outdir` and writes labels.txt and export.json.

    With `check`, each written model is run on `check_inputs` and compared with JAX; the largest
    absolute difference of each format is in the result under "max_abs_diff".
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"formats {list(formats)}: expected a subset of {list(FORMATS)}")
    if input_dtype not in ("float32", "uint8"):
        raise ValueError(f"input_dtype must be float32 or uint8, got {input_dtype!r}")
    loaded = inference.load(checkpoint_path)
    os.makedirs(outdir, exist_ok=True)
    paths = {f: os.path.join(outdir, FILES[f]) for f in FORMATS}
    export_savedmodel(loaded, paths["savedmodel"], input_dtype)
    intermediate = [] if "savedmodel" in formats else [paths["savedmodel"]]
    if "tflite" in formats or "onnx" in formats:
        export_tflite(paths["savedmodel"], paths["tflite"])
        if "tflite" not in formats:
            intermediate.append(paths["tflite"])
    if "onnx" in formats:
        export_onnx(paths["tflite"], paths["onnx"], loaded.class_names)
    for path in intermediate:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)

    result = {
        "checkpoint": loaded.path, "step": loaded.step,
        "formats": {f: FILES[f] for f in formats},
        "input": {"name": INPUT_NAME, "shape": [None, SIZE, SIZE, 1], "dtype": input_dtype,
                  "values": "raw grayscale pixels 0-255; per-image standardisation is inside"},
        "output": {"name": OUTPUT_NAME, "shape": [None, len(loaded.class_names)],
                   "values": "softmax probabilities, in class_names order"},
        "class_names": list(loaded.class_names),
    }
    if check:
        images = check_inputs()
        reference = jax_probabilities(loaded, images)
        result["max_abs_diff"] = {
            f: float(np.max(np.abs(RUNNERS[f](paths[f], images) - reference))) for f in formats}
    with open(os.path.join(outdir, "labels.txt"), "w") as f:
        f.write("".join(name + "\n" for name in loaded.class_names))
    with open(os.path.join(outdir, "export.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fermsca.export",
                                description="Export a checkpoint as SavedModel, TFLite and ONNX.")
    p.add_argument("--checkpoint", required=True, help="training workdir or checkpoint folder")
    p.add_argument("--output", required=True, metavar="OUTDIR")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: all)")
    p.add_argument("--input_dtype", default="float32", choices=("float32", "uint8"))
    p.add_argument("--no_check", dest="check", action="store_false",
                   help="skip running each exported model against JAX")
    p.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        result = export(args.checkpoint, args.output, formats, input_dtype=args.input_dtype,
                        check=args.check)
    except (*cli.anticipated_errors(), ImportError) as e:
        if args.verbose:
            traceback.print_exc()
        print(cli.one_line(e), file=sys.stderr)
        return cli.EXIT_ERROR
    for f in formats:
        diff = result.get("max_abs_diff", {}).get(f)
        note = "" if diff is None else f" (max |diff| from JAX {diff:.2e})"
        print(f"{f}: {os.path.join(args.output, FILES[f])}{note}")
    bad = {f: d for f, d in result.get("max_abs_diff", {}).items() if d > TOLERANCE}
    if bad:
        print(f"error: exported models differ from JAX by more than {TOLERANCE:g}: {bad}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
