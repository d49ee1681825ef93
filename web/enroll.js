// The enroll page: consent, a guided webcam self-scan with the microphone's sound if it is
// allowed, the upload, then the training's progress until the new identity is ready (the
// HTTP API in docs/PROTOCOL.md, "Enrollment").
// ?seconds=N records N seconds instead of 30 (tests); ?token=T fills the token.
"use strict";

// The enrollment trains on the first four fifths of the recording and holds out the last
// fifth to check the result (HOLDOUT in engines/neural/config.py): everything the avatar must
// learn, the turns and its own teeth above all, comes before it, and the last fifth mixes
// them once more so the check sees every kind of frame. (With the smile last, its teeth were
// never trained on, nor in the mouth memory.)
const PROMPTS = [ // [what to do, share of the recording]
  ["Look straight into the camera", 2],
  ["Turn your head slowly to the left", 3],
  ["…and slowly to the right", 3],
  ["Look up", 2],
  ["Look down", 2],
  ["Talk: count out loud from one to ten", 5],
  ["Smile wide, showing your teeth", 3],
  ["Blink a few times", 2],
  ["Back to neutral: look straight, mouth closed", 2],
  ["Once more, freely: turn a little, talk, smile, blink", 6],
];
const STAGES = {
  extracting: "Finding your face in every frame",
  preparing: "Preparing the training frames",
  training: "Training your personal generator",
  evaluating: "Checking it on frames it has not seen",
  writing: "Saving the new identity",
  interrupted: "Resuming after a server restart",
};
// The first the browser records; those that carry sound first, tried only when there is sound.
const MIME_TYPES = ["video/webm;codecs=vp9,opus", "video/webm;codecs=vp8,opus", "video/mp4;codecs=avc1,mp4a.40.2",
                    "video/webm;codecs=vp9", "video/webm;codecs=vp8", "video/webm", "video/mp4"];
const SOUND_CODECS = /opus|mp4a/;
const CAMERA = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } };
// The voice as it is: the training learns mouth shapes from the sounds of speech, and echo
// cancellation, noise suppression and gain control clip word onsets and thin out the quiet
// consonants (s, f, th) it needs. Nothing plays while recording (the preview is muted), so
// there is no echo to cancel. Plain values, not `exact`: a browser that cannot turn one off
// still gives the microphone.
const MICROPHONE = { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 };
const NO_SOUND = "Recording without sound: your avatar's mouth will use general shapes.";

const page = window.enroll = { state: "form", job: null, lastError: null, limits: null, seconds: 30, sound: null };
let stream = null;
let events = null;

// ---- the server ----------------------------------------------------------------------
function token() {
  return $("token").value.trim();
}

function authHeaders() {
  return token() ? { Authorization: `Bearer ${token()}` } : {};
}

// A server error as a sentence: its own message, or what the status means.
function errorText(status, body) {
  if (body && body.message) return body.message;
  return { 401: "The server did not accept the token.", 413: "The recording is too large.",
           503: "The server is busy; try again later." }[status] || `The server answered ${status}.`;
}

function fail(text) {
  page.lastError = text;
  say(text, "error");
}

async function api(method, path) {
  const response = await fetch(path, { method, headers: authHeaders() });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(errorText(response.status, body));
  return body;
}

// ---- step 1: who, and the consent they accept ------------------------------------------
function statement() {
  const who = $("subject").value.trim() || "[your full name]";
  return `I, ${who}, agree that this recording of my face, and of my voice if I allow the microphone, is ` +
    "used to build an avatar of me on this server. My voice is used only to learn how my mouth moves when I speak. " +
    "The avatar may be used as a live avatar, in offline renders, and to train it. Everything it makes is " +
    "marked as synthetic. The recording, sound included, is deleted as soon as the training ends or is " +
    "cancelled; the avatar keeps pictures of my face and what it learned. I can withdraw this consent at " +
    "any time, and then every use of the avatar stops.";
}

function formProblem() {
  if (!$("subject").value.trim()) return "Enter your full name.";
  if (!$("name").checkValidity() || !$("name").value) return "Choose an identity name: lowercase letters, digits, '-' or '_'.";
  if (!$("accepted").checked) return "Read the statement and tick the box to agree.";
  return null;
}

$("subject").addEventListener("input", () => {
  $("statement").textContent = statement();
  $("accepted").checked = false; // a changed statement must be accepted again
});
$("accepted").addEventListener("change", () => {
  if ($("accepted").checked) say("Thank you. Now turn on the camera and microphone.", "ok");
});

// ---- step 2: camera and the guided recording -------------------------------------------
function show(step) {
  for (const id of ["step-form", "step-record", "step-train"]) $(id).hidden = id !== step;
}

async function cameraOn() {
  const problem = formProblem();
  if (problem) return fail(problem);
  try { // the server's word on the name now, not after 30 seconds of recording
    const verdict = (await api("GET", `/enrollments?name=${encodeURIComponent($("name").value)}`)).name;
    if (!verdict.ok) return fail(verdict.message);
  } catch (e) {
    return fail(e.message);
  }
  try {
    stream = await cameraAndMicrophone();
  } catch (e) {
    return fail(`The camera is not available: ${e.message}. Allow it for this page (browsers allow it on https or localhost).`);
  }
  page.sound = stream.getAudioTracks().length > 0;
  $("preview").srcObject = stream;
  $("sound").textContent = page.sound ? "Your microphone records too: speak naturally, and your avatar learns how " +
    "your mouth moves." : NO_SOUND;
  show("step-record");
  page.state = "camera";
  $("record").disabled = false;
  const check = "Check that your whole face is in the picture and well lit, then start recording.";
  say(page.sound ? check : `${NO_SOUND} ${check}`, page.sound ? "info" : "warn");
}

// Both, or the camera alone if the microphone is refused or missing: sound helps, but it is
// never what stops an enrollment.
async function cameraAndMicrophone() {
  try {
    return await navigator.mediaDevices.getUserMedia({ video: CAMERA, audio: MICROPHONE });
  } catch (e) {
    console.warn("no microphone, recording without sound:", e);
    return navigator.mediaDevices.getUserMedia({ video: CAMERA, audio: false });
  }
}

function cameraOff() {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  $("preview").srcObject = null;
}

function pickMimeType(sound) {
  const types = sound ? MIME_TYPES : MIME_TYPES.filter((t) => !SOUND_CODECS.test(t));
  return types.find((t) => window.MediaRecorder && MediaRecorder.isTypeSupported(t)) || "";
}

// The prompt due `t` seconds into a recording of `total` seconds.
function promptAt(t, total) {
  const weight = PROMPTS.reduce((s, p) => s + p[1], 0);
  let end = 0;
  for (const [text, share] of PROMPTS) {
    end += (share / weight) * total;
    if (t < end) return text;
  }
  return PROMPTS[PROMPTS.length - 1][0];
}

function countdown(seconds) {
  return new Promise((resolve) => {
    let left = seconds;
    $("countdown").hidden = false;
    $("countdown").textContent = left;
    const timer = setInterval(() => {
      left -= 1;
      $("countdown").textContent = left;
      if (left <= 0) {
        clearInterval(timer);
        $("countdown").hidden = true;
        resolve();
      }
    }, 1000);
  });
}

async function record() {
  const mimeType = pickMimeType(page.sound);
  if (!mimeType) return fail("This browser cannot record video (no MediaRecorder); try a current Chrome or Firefox.");
  $("record").disabled = true;
  $("record-cancel").disabled = true;
  page.state = "countdown";
  say("Get ready…", "info");
  await countdown(3);
  const chunks = [];
  const recorder = new MediaRecorder(stream, { mimeType, videoBitsPerSecond: 2_500_000 });
  recorder.ondataavailable = (ev) => { if (ev.data.size) chunks.push(ev.data); };
  const stopped = new Promise((resolve) => { recorder.onstop = resolve; });
  recorder.start(1000);
  page.state = "recording";
  $("rec").hidden = false;
  await guide(page.seconds);
  $("rec").hidden = true;
  recorder.stop();
  await stopped;
  cameraOff();
  $("record-cancel").disabled = false;
  page.blob = new Blob(chunks, { type: mimeType.split(";")[0] });
  upload(page.blob);
}

// Show the prompts and the time left until the recording is `total` seconds long.
function guide(total) {
  const start = performance.now();
  $("prompt").hidden = false;
  return new Promise((resolve) => {
    const timer = setInterval(() => {
      const t = (performance.now() - start) / 1000;
      $("prompt").textContent = promptAt(t, total);
      $("record-bar").style.width = `${Math.min(100, (100 * t) / total)}%`;
      say(`Recording: ${Math.max(0, Math.ceil(total - t))} s left.`, "warn");
      if (t >= total) {
        clearInterval(timer);
        $("prompt").hidden = true;
        resolve();
      }
    }, 100);
  });
}

// ---- step 3: upload, then follow the training -------------------------------------------
function upload(blob) {
  const limits = page.limits;
  if (limits && blob.size > limits.max_bytes) {
    return fail(`The recording is ${(blob.size / 2 ** 20).toFixed(0)} MB, over the server's limit of ` +
      `${(limits.max_bytes / 2 ** 20).toFixed(0)} MB. Record again with less movement or a smaller camera picture.`);
  }
  show("step-train");
  page.state = "uploading";
  $("job-cancel").hidden = true;
  const form = new FormData(); // the fields first: the server checks them before it takes the video
  form.append("name", $("name").value);
  form.append("display_name", $("display-name").value.trim());
  form.append("subject", $("subject").value.trim());
  form.append("statement", statement());
  form.append("accepted", $("accepted").checked ? "true" : "false");
  form.append("video", blob, blob.type === "video/mp4" ? "selfscan.mp4" : "selfscan.webm");
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/enrollments");
  if (token()) xhr.setRequestHeader("Authorization", `Bearer ${token()}`);
  xhr.upload.onprogress = (ev) => {
    if (!ev.lengthComputable) return;
    const share = ev.loaded / ev.total;
    $("train-bar").style.width = `${100 * share}%`;
    $("train-stage").textContent = `Uploading the recording… ${(100 * share).toFixed(0)}%`;
  };
  xhr.onload = () => {
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON: errorText says the status */ }
    if (xhr.status !== 201) return uploadFailed(errorText(xhr.status, body), RETRYABLE.has(xhr.status));
    follow(body);
  };
  xhr.onerror = () => uploadFailed("The upload failed: the connection to the server broke.", true);
  xhr.send(form);
  say("Uploading your recording. Keep this page open.", "info");
}

// Busy, rate-limited or short of space: the same recording may be sent again later.
const RETRYABLE = new Set([429, 503, 507]);

function uploadFailed(text, retryable) {
  page.state = "failed";
  $("train-stage").textContent = retryable ? "The recording was not sent." : "The recording was not accepted.";
  resetBar($("train-bar"));
  $("again").hidden = false;
  $("resend").hidden = !retryable;
  fail(text);
}

// Back to empty at once, not slid down from the upload's 100%.
function resetBar(bar) {
  bar.classList.add("instant");
  bar.style.width = "0";
  void bar.offsetWidth; // apply it before the transition comes back
  bar.classList.remove("instant");
}

function follow(job) {
  resetBar($("train-bar"));
  showJob(job);
  const query = token() ? `?token=${encodeURIComponent(token())}` : ""; // EventSource sends no headers
  events = new EventSource(`/enrollments/${job.id}/events${query}`);
  events.onmessage = (ev) => showJob(JSON.parse(ev.data));
  events.onerror = () => {
    if (page.job && !isFinal(page.job)) say("Lost the connection to the server; reconnecting…", "warn");
  };
}

function isFinal(job) {
  return ["done", "failed", "cancelled"].includes(job.state);
}

function minutes(seconds) {
  return seconds < 90 ? `${Math.round(seconds)} s` : `${Math.round(seconds / 60)} min`;
}

function showJob(job) {
  page.job = job;
  page.state = job.state;
  $("train-bar").style.width = `${100 * (job.fraction || 0)}%`;
  $("job-cancel").hidden = isFinal(job);
  showSound(job);
  if (job.state === "queued") {
    $("train-stage").textContent = job.stage === "interrupted" ? STAGES.interrupted : "Waiting for the server";
    $("train-detail").textContent = job.position > 1 ? `Yours is number ${job.position} in line.`
      : "Yours is next in line.";
    say("Your recording is in. The training starts when the server is free.", "info");
  } else if (job.state === "running") {
    showRunning(job);
  } else {
    finished(job);
  }
}

// What the server found in the recording: sound or none (its probe's word, not the page's).
function showSound(job) {
  $("train-sound").hidden = !("audio" in job) || ["failed", "cancelled"].includes(job.state);
  $("train-sound").textContent = job.audio ? "Recorded with sound: your avatar's mouth is learned from your own speech."
    : "Recorded without sound: your avatar's mouth will use general shapes.";
}

function showRunning(job) {
  const stage = STAGES[job.stage] || "Starting the training process";
  const count = job.total ? ` (${job.stage === "training" ? "step" : "frame"} ${job.done} of ${job.total})` : "";
  $("train-stage").textContent = `${stage}${count}`;
  $("train-detail").textContent = `${(100 * job.fraction).toFixed(0)}% done` +
    (job.eta != null ? ` · about ${minutes(job.eta)} of training left` : "") +
    " · live avatars on this server keep priority, so this may slow down while people present.";
  say(`Building the avatar “${job.display_name}”. You can leave this page open or come back later.`, "info");
}

function finished(job) {
  if (events) events.close();
  $("train-detail").textContent = "";
  $("again").hidden = job.state === "done";
  if (job.state === "done") {
    $("train-stage").textContent = `“${job.display_name}” is ready.`;
    const params = new URLSearchParams({ identity: job.name });
    if (new URLSearchParams(location.search).get("token")) params.set("token", token());
    $("present-link").href = `/?${params}`;
    $("done").hidden = false;
    say("Done: your new identity is in the presenter page's list.", "ok");
  } else if (job.state === "cancelled") {
    $("train-stage").textContent = "Cancelled. The recording was deleted.";
    say("The enrollment was cancelled.", "warn");
  } else {
    $("train-stage").textContent = "The enrollment failed. The recording was deleted.";
    fail(`The enrollment failed: ${job.error}`);
  }
}

async function cancelJob() {
  if (!page.job) return;
  $("job-cancel").disabled = true;
  try {
    showJob(await api("DELETE", `/enrollments/${page.job.id}`));
  } catch (e) {
    fail(e.message);
  } finally {
    $("job-cancel").disabled = false;
  }
}

function again() {
  if (events) events.close();
  page.job = null;
  page.blob = null;
  page.state = "form";
  $("again").hidden = true;
  $("resend").hidden = true;
  $("done").hidden = true;
  $("record-bar").style.width = "0";
  show("step-form");
  say("Fill in the form and record again.", "info");
}

// ---- page setup ----------------------------------------------------------------------
async function loadLimits() {
  try {
    const body = await api("GET", "/enrollments");
    page.limits = body.limits;
    const wanted = Number(new URLSearchParams(location.search).get("seconds")) || 30;
    page.seconds = Math.min(body.limits.max_seconds - 1, Math.max(body.limits.min_seconds + 1, wanted));
    $("record-seconds").textContent = page.seconds;
    const open = body.jobs.filter((j) => !isFinal(j)).pop();
    if (open) { // a reload, or back later: follow the enrollment still under way
      show("step-train");
      follow(open);
    }
  } catch (e) {
    fail(e.message);
  }
}

$("camera-on").addEventListener("click", cameraOn);
$("record").addEventListener("click", record);
$("record-cancel").addEventListener("click", () => { cameraOff(); show("step-form"); page.state = "form"; });
$("job-cancel").addEventListener("click", cancelJob);
$("again").addEventListener("click", again);
$("resend").addEventListener("click", () => { $("resend").hidden = true; $("again").hidden = true; upload(page.blob); });
$("token").addEventListener("change", loadLimits);

(function init() {
  const params = new URLSearchParams(location.search);
  if (params.get("token")) $("token").value = params.get("token");
  $("statement").textContent = statement();
  loadLimits();
})();
