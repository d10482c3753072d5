// bert: Hugging Face BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA) loaded from a checkpoint
// directory, with the WordPiece tokenizer of wordpiece_tokenizer.h.
//
// Directory layout (as written by transformers / sentence-transformers):
//   config.json        model_type: bert | roberta | xlm-roberta | camembert | electra. Keys read (HF defaults when
//                      absent): vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
//                      hidden_act (gelu = erf GELU; gelu_new / gelu_pytorch_tanh / gelu_fast = tanh GELU; relu;
//                      silu / swish), max_position_embeddings, type_vocab_size, layer_norm_eps, pad_token_id,
//                      position_embedding_type (only "absolute"), embedding_size (ELECTRA; adds embeddings_project).
//   model.safetensors  HF tensor names, with or without a model prefix ("bert.", "roberta.", "electra.", ...: the
//                      shortest prefix in front of "embeddings.word_embeddings.weight"), so BertModel and
//                      BertForXxx checkpoints both load; heads (pooler, cls.*, classifier.*, lm_head.*) are ignored.
//                      F32 / F16 / BF16 tensors; LayerNorm "gamma"/"beta" names are accepted for weight/bias.
//                      Sharded checkpoints and pytorch_model.bin are not supported.
//   vocab.txt          WordPiece vocabulary (or tokenizer.json with a WordPiece model); tokenizer_config.json
//                      options (do_lower_case, strip_accents, ...) when present.
//   modules.json, 1_Pooling/config.json
//                      sentence-transformers pooling when present: cls / mean / max / mean_sqrt_len_tokens (several
//                      modes concatenate in sentence-transformers order), and a Normalize module -> L2 normalisation.
//                      A Dense module or another unknown module is UNIMPLEMENTED (it would change the embedding).
//
// Sentence embedding (`pooled`) when there is no sentence-transformers config: the CLS token's last hidden state,
// WITHOUT the pooler dense+tanh (the pooler is trained for next-sentence prediction, not for similarity; most
// sentence-embedding checkpoints that use CLS pooling, e.g. BGE, use the raw CLS state). ModelInfo::pooling says
// which applies ("cls", "mean+l2", ...).
//
// Embeddings: word + token_type(0) + position, then LayerNorm. Position ids come from the attention mask, so a row
// gets the positions it would have alone wherever padding sits: BERT/ELECTRA cumsum(mask) - 1; RoBERTa-style
// (roberta, xlm-roberta, camembert) cumsum(mask) + pad_token_id, as HF's create_position_ids_from_input_ids, and
// the longest input is max_position_embeddings - pad_token_id - 1 tokens.
//
// Modules (forward order; parameters are "<module>.weight" / "<module>.bias"):
//   embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings (kEmbedding),
//   embeddings.LayerNorm, [embeddings_project (ELECTRA with embedding_size != hidden_size)], then per layer N:
//   encoder.layer.N.attention.self.{query,key,value} (kLinear), encoder.layer.N.attention.self (kAttention),
//   encoder.layer.N.attention.output.dense, encoder.layer.N.attention.output (kBlockOutput: the dense output before
//   residual + LayerNorm), encoder.layer.N.attention.output.LayerNorm, encoder.layer.N.intermediate.dense,
//   encoder.layer.N.output.dense, encoder.layer.N.output (kBlockOutput), encoder.layer.N.output.LayerNorm.
// Hooks: OnTokenEmbeddings after the word-embedding lookup; OnLinear after every linear (q/k/v are computed by one
// fused matmul and reported as three slices); OnLayerNorm after every LayerNorm (input = the pre-norm sum);
// OnAttentionKeyValue with [B,NH,T,DH] keys/values; OnBlockOutput at the two kBlockOutput points.
// parameters() holds the q/k/v weights as views into the fused weight (no extra memory).
//
// Compute dtype float32 or bfloat16 (outputs float32), any device LibTorch supports. Forward runs under
// c10::InferenceMode and is thread-safe.
#ifndef DELTASERVE_SERVER_MODEL_BERT_BERT_MODEL_H_
#define DELTASERVE_SERVER_MODEL_BERT_BERT_MODEL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/model/model.h"

namespace deltaserve {
namespace model {

// Loads a Hugging Face BERT-family directory (see above). Errors name the file (and tensor): NOT_FOUND for a
// missing file or tensor, INVALID_ARGUMENT for a malformed config or a tensor of the wrong shape, UNIMPLEMENTED for
// an unsupported feature; options.device / options.dtype that cannot be used are INVALID_ARGUMENT.
absl::StatusOr<std::unique_ptr<Model>> LoadBertModel(const std::string& dir, const ModelOptions& options);

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_BERT_BERT_MODEL_H_
