// fermsca webcam demo: faces found by OpenCV.js with the Haar cascade of fermsca/faces.py, cropped and
// resized as there, classified by the exported FER+ model (model.onnx) with onnxruntime-web's wasm
// backend. Everything runs in the page; every file comes from this site (see fermsca/demo.py).
//
// For tests, window.__fermsca keeps the last result (frame, boxes, crops, probabilities) and finds
// faces in any grey image (findFaces); for the benchmark, __fermsca.timing holds the time of each
// stage of each step (performance.now(), ms).

import * as ort from './vendor/ort/ort.wasm.min.mjs';

// Stages of a step: grab (frame to grey), detect, crop, infer (ONNX), draw; step is their total.
const STAGES = ['grab', 'detect', 'crop', 'infer', 'draw', 'step'];
const SAMPLES = 4096;  // the per-step times of the last SAMPLES steps are kept (for medians)
const timing = {
  steps: 0, faces: 0, cameraFrames: null,  // camera frames presented so far, where the browser tells
  sum: Object.fromEntries(STAGES.map((k) => [k, 0])),  // ms per stage over all steps
  samples: [],  // {at: start time, faces, grab, detect, ...}, a ring of SAMPLES, slot steps % SAMPLES
};
const state = {ready: false, error: null, frames: 0, classNames: [], settings: null, last: null,
               snapshot, findFaces: null, timing};
window.__fermsca = state;

function record(sample) {
  for (const k of STAGES) timing.sum[k] += sample[k];
  timing.samples[timing.steps % SAMPLES] = sample;
  timing.steps += 1;
  timing.faces += sample.faces;
}

// ---------------------------------------------------------------------------------------------
// Geometry and cropping, as fermsca/faces.py.

/** Python's round(): halves go to the even neighbour. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** faces.square_box: the square of side max(w, h) * (1 + 2 margin) around the box's centre. */
export function squareBox([x, y, w, h], margin) {
  const side = Math.max(1, roundHalfEven(Math.max(w, h) * (1 + 2 * margin)));
  const cx = x + w / 2, cy = y + h / 2;
  return [roundHalfEven(cx - side / 2), roundHalfEven(cy - side / 2), side, side];
}

/** faces.detect_faces: boxes [x, y, w, h] in `gray`'s pixels, largest first. */
function detectFaces(cv, classifier, gray, s) {
  const height = gray.rows, width = gray.cols;
  const scale = Math.min(1, s.max_side / Math.max(height, width));
  let small = gray;
  if (scale < 1) {
    small = new cv.Mat();
    const size = new cv.Size(Math.max(1, roundHalfEven(width * scale)),
                             Math.max(1, roundHalfEven(height * scale)));
    cv.resize(gray, small, size, 0, 0, cv.INTER_AREA);
  }
  const minSide = Math.max(1, roundHalfEven(s.min_size * scale));
  const found = new cv.RectVector();
  try {
    classifier.detectMultiScale(small, found, s.scale_factor, s.min_neighbors, 0,
                                new cv.Size(minSide, minSide), new cv.Size(0, 0));
    const boxes = [];
    for (let i = 0; i < found.size(); i++) {
      const r = found.get(i);
      const x0 = roundHalfEven(r.x / scale), y0 = roundHalfEven(r.y / scale);
      const x1 = Math.min(width, roundHalfEven((r.x + r.width) / scale));
      const y1 = Math.min(height, roundHalfEven((r.y + r.height) / scale));
      boxes.push([x0, y0, x1 - x0, y1 - y0]);
    }
    return boxes.sort((a, b) => b[2] * b[3] - a[2] * a[3] || a[1] - b[1] || a[0] - b[0]);
  } finally {
    found.delete();
    if (small !== gray) small.delete();
  }
}

/** faces.crop_face: the square around the box, edge pixels repeated outside the image, resized
 * to size x size (area averaging when shrinking, bilinear when enlarging). Uint8Array [size*size]. */
function cropFace(cv, gray, box, margin, size) {
  const height = gray.rows, width = gray.cols;
  const [x, y, side] = squareBox(box, margin);
  const x0 = Math.max(x, 0), y0 = Math.max(y, 0);
  const x1 = Math.min(x + side, width), y1 = Math.min(y + side, height);
  const inside = gray.roi(new cv.Rect(x0, y0, x1 - x0, y1 - y0));
  const square = new cv.Mat();
  const out = new cv.Mat();
  try {
    cv.copyMakeBorder(inside, square, y0 - y, y + side - y1, x0 - x, x + side - x1,
                      cv.BORDER_REPLICATE);
    if (side === size) square.copyTo(out);
    else cv.resize(square, out, new cv.Size(size, size), 0, 0,
                   side > size ? cv.INTER_AREA : cv.INTER_LINEAR);
    return new Uint8Array(out.data);
  } finally {
    inside.delete();
    square.delete();
    out.delete();
  }
}

/** Boxes (largest first) and their 48x48 crops in a grey cv.Mat, as LoadedModel.classify_image. */
function findFaces(cv, classifier, gray, s) {
  const boxes = detectFaces(cv, classifier, gray, s.detect);
  return {boxes, crops: boxes.map((box) => cropFace(cv, gray, box, s.margin, s.face_size))};
}

// ---------------------------------------------------------------------------------------------
// Loading.

/** window.cv once its runtime is ready. Never resolves a promise with cv itself: the OpenCV.js
 * module has a then() that resolves with the module again, which would loop forever. */
async function openCv() {
  const cv = window.cv;
  if (!cv) throw new Error('vendor/opencv.js did not load');
  if (!cv.Mat) await new Promise((resolve) => { cv.onRuntimeInitialized = () => resolve(); });
  return {cv};
}

async function fetchOk(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response;
}

async function loadDetector(cv, file) {
  const xml = new Uint8Array(await (await fetchOk(file)).arrayBuffer());
  cv.FS_createDataFile('/', file, xml, true, false, false);
  const classifier = new cv.CascadeClassifier();
  if (!classifier.load(file)) throw new Error(`${file}: OpenCV.js could not load the cascade`);
  return classifier;
}

async function loadModel(file) {
  ort.env.wasm.wasmPaths = new URL('./vendor/ort/', import.meta.url).href;
  ort.env.wasm.numThreads = 1;  // threads need a cross-origin-isolated page; the model is small
  return ort.InferenceSession.create(file, {executionProviders: ['wasm']});
}

// ---------------------------------------------------------------------------------------------
// Drawing.

function buildBars(container, classNames) {
  container.replaceChildren();
  return classNames.map((name) => {
    const row = document.createElement('div');
    row.className = 'bar';
    const label = document.createElement('span');
    label.textContent = name;
    const track = document.createElement('span');
    track.className = 'track';
    const fill = document.createElement('span');
    fill.className = 'fill';
    track.append(fill);
    const value = document.createElement('span');
    value.className = 'value';
    row.append(label, track, value);
    container.append(row);
    return {fill, value};
  });
}

function drawFaces(ctx, faces) {
  ctx.lineWidth = 3;
  ctx.font = '16px sans-serif';
  ctx.textBaseline = 'bottom';
  faces.forEach((face, i) => {
    const [x, y, w, h] = face.box;
    ctx.strokeStyle = i === 0 ? '#2ecc40' : '#ffdc00';
    ctx.strokeRect(x, y, w, h);
    const text = `${face.label} ${(100 * face.score).toFixed(0)}%`;
    const tw = ctx.measureText(text).width + 8;
    ctx.fillStyle = ctx.strokeStyle;
    ctx.fillRect(x - 1.5, y - 22, tw, 22);
    ctx.fillStyle = '#111';
    ctx.fillText(text, x + 3, y - 3);
  });
}

function showBars(bars, probabilities) {
  bars.forEach((bar, k) => {
    const p = probabilities ? probabilities[k] : 0;
    bar.fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.value.textContent = probabilities ? p.toFixed(2) : '';
  });
}

// ---------------------------------------------------------------------------------------------
// The loop: grab a frame, find faces, classify them, draw.

async function classify(session, crops, size) {
  const input = new Float32Array(crops.length * size * size);
  crops.forEach((crop, i) => input.set(crop, i * size * size));  // raw 0-255; the graph standardises
  const feeds = {[session.inputNames[0]]: new ort.Tensor('float32', input, [crops.length, size, size, 1])};
  const output = (await session.run(feeds))[session.outputNames[0]];
  const k = output.dims[1];
  return crops.map((_, i) => output.data.slice(i * k, (i + 1) * k));
}

async function step(cv, classifier, session, video, grab, view, bars) {
  const t0 = performance.now();
  const {width, height} = grab.canvas;
  grab.drawImage(video, 0, 0, width, height);
  const rgba = cv.matFromImageData(grab.getImageData(0, 0, width, height));
  const gray = new cv.Mat();
  const s = state.settings;
  let boxes, crops, frame, t1, t2, t3;
  try {
    cv.cvtColor(rgba, gray, cv.COLOR_RGBA2GRAY);  // ITU-R 601, as faces.to_gray
    frame = new Uint8Array(gray.data);
    t1 = performance.now();
    boxes = detectFaces(cv, classifier, gray, s.detect);  // findFaces, in two timed stages
    t2 = performance.now();
    crops = boxes.map((box) => cropFace(cv, gray, box, s.margin, s.face_size));
    t3 = performance.now();
  } finally {
    rgba.delete();
    gray.delete();
  }
  const probabilities = crops.length ? await classify(session, crops, s.face_size) : [];
  const t4 = performance.now();
  const faces = boxes.map((box, i) => {
    const p = probabilities[i];
    let best = 0;
    for (let k = 1; k < p.length; k++) if (p[k] > p[best]) best = k;
    return {box, crop: crops[i], probabilities: p, label: state.classNames[best], score: p[best]};
  });
  view.drawImage(grab.canvas, 0, 0);  // the frame that was classified, then its boxes
  drawFaces(view, faces);
  showBars(bars, faces.length ? faces[0].probabilities : null);
  state.last = {width, height, frame, faces};
  state.frames += 1;
  const t5 = performance.now();
  record({at: t0, faces: faces.length, grab: t1 - t0, detect: t2 - t1, crop: t3 - t2, infer: t4 - t3,
          draw: t5 - t4, step: t5 - t0});
}

async function main() {
  const status = document.getElementById('status');
  try {
    status.textContent = 'loading OpenCV.js, the face cascade and the model…';
    const settings = await (await fetchOk('settings.json')).json();
    state.settings = settings;
    state.classNames = settings.class_names;
    const {cv} = await openCv();
    const [classifier, session] = await Promise.all([
      loadDetector(cv, settings.cascade), loadModel(settings.model)]);
    state.findFaces = (text, width, height) => findFacesIn(cv, classifier, text, width, height);
    const bars = buildBars(document.getElementById('bars'), settings.class_names);

    status.textContent = 'waiting for the camera…';
    const video = document.getElementById('video');
    video.srcObject = await navigator.mediaDevices.getUserMedia({video: true, audio: false});
    await video.play();
    const canvas = document.getElementById('view');
    const grabbed = document.createElement('canvas');
    canvas.width = grabbed.width = video.videoWidth;
    canvas.height = grabbed.height = video.videoHeight;
    const grab = grabbed.getContext('2d', {willReadFrequently: true});
    const view = canvas.getContext('2d');
    state.ready = true;
    status.textContent = `camera ${canvas.width}x${canvas.height}; everything runs in this page`;
    // One step per new camera frame where the browser tells when one arrives.
    const next = video.requestVideoFrameCallback
      ? () => video.requestVideoFrameCallback((now, meta) => {
        timing.cameraFrames = meta.presentedFrames;
        loop();
      }) : () => setTimeout(loop, 0);
    const loop = async () => {
      try {
        await step(cv, classifier, session, video, grab, view, bars);
        next();
      } catch (e) {
        fail(status, e);
      }
    };
    loop();
  } catch (e) {
    fail(status, e);
  }
}

function fail(status, e) {
  state.error = String(e && e.message ? e.message : e);
  status.textContent = `error: ${state.error}`;
  status.className = 'error';
}

// ---------------------------------------------------------------------------------------------
// For tests: the last result as JSON, and faces found in any grey image; pixels base64-encoded.

function base64(bytes) {
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function findFacesIn(cv, classifier, text, width, height) {
  const gray = new cv.Mat(height, width, cv.CV_8UC1);
  try {
    gray.data.set(Uint8Array.from(atob(text), (c) => c.charCodeAt(0)));
    const {boxes, crops} = findFaces(cv, classifier, gray, state.settings);
    return {boxes, crops: crops.map(base64)};
  } finally {
    gray.delete();
  }
}

function snapshot() {
  const last = state.last;
  if (!last) return null;
  return {
    frames: state.frames, width: last.width, height: last.height, frame: base64(last.frame),
    faces: last.faces.map((f) => ({box: f.box, label: f.label, score: f.score,
                                   probabilities: Array.from(f.probabilities), crop: base64(f.crop)})),
  };
}

main();
