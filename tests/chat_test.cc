// Chat templates (lutra/runtime/chat_template.h): family detection from
// tokenizer.chat_template signatures, the formatted segments of a
// conversation (system + 2 turns) for ChatML, Llama 3 and Llama 2, that
// turn-by-turn prompts concatenate to the whole conversation, the token ids
// (special pieces looked up exactly, user text never parsed for them), and
// the errors for unknown templates and missing special tokens.
#include "lutra/runtime/chat_template.h"

#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "lutra/format/gguf.h"
#include "tests/test_util.h"

namespace lutra {
namespace {

using test::Contains;
using Seg = ChatSegment;

// Shortened real templates (the signature parts as the models ship them).
const char kQwenTemplate[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
const char kLlama3Template[] =
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}";
const char kLlama2Template[] =
    "{% if messages[0]['role'] == 'system' %}...{{ bos_token + '[INST] ' + content.strip() + "
    "' [/INST]' }}";

TEST_CASE("Chat template families are recognised by signature", "[chat]") {
  CHECK(DetectChatFormat(kQwenTemplate).value() == ChatFormat::kChatML);
  CHECK(DetectChatFormat(kLlama3Template).value() == ChatFormat::kLlama3);
  CHECK(DetectChatFormat(kLlama2Template).value() == ChatFormat::kLlama2);
  CHECK(ParseChatFormat("chatml").value() == ChatFormat::kChatML);
  CHECK(ParseChatFormat("llama3").value() == ChatFormat::kLlama3);
  CHECK(ParseChatFormat("llama2").value() == ChatFormat::kLlama2);
  for (ChatFormat f : {ChatFormat::kChatML, ChatFormat::kLlama3, ChatFormat::kLlama2}) {
    CHECK(ParseChatFormat(ChatFormatName(f)).value() == f);
  }
}

TEST_CASE("Unknown chat templates are errors naming them", "[chat]") {
  // Gemma's template: none of the three signatures.
  const std::string gemma =
      "{{ bos_token }}{% for message in messages %}\n{{ '<start_of_turn>' + role + '\\n' + "
      "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}";
  const Status s = DetectChatFormat(gemma).status();
  CHECK(s.code() == StatusCode::kInvalidArgument);
  INFO(s.message());
  CHECK(Contains(s.message(), "not recognised"));
  CHECK(Contains(s.message(), "'{{ bos_token }}{% for message in messages %}\\n{{ '<start_of_t...'"));
  CHECK(Contains(s.message(), "--chat-template chatml|llama3|llama2"));
  const Status empty = DetectChatFormat("").status();
  CHECK(Contains(empty.message(), "no tokenizer.chat_template"));
  CHECK(Contains(empty.message(), "--chat-template"));
  const Status bad = ParseChatFormat("gemma").status();
  CHECK(Contains(bad.message(), "'gemma'"));
  CHECK(Contains(bad.message(), "chatml, llama3 or llama2"));
}

const std::vector<ChatMessage> kConversation = {{"system", "Be brief."},
                                                {"user", "Hi"},
                                                {"assistant", "Hello!"},
                                                {"user", "Why?"}};

TEST_CASE("ChatML: system + 2 turns", "[chat]") {
  const std::vector<Seg> expected = {
      {Seg::kSpecial, "<|im_start|>"}, {Seg::kText, "system\nBe brief."},
      {Seg::kSpecial, "<|im_end|>"},   {Seg::kText, "\n"},
      {Seg::kSpecial, "<|im_start|>"}, {Seg::kText, "user\nHi"},
      {Seg::kSpecial, "<|im_end|>"},   {Seg::kText, "\n"},
      {Seg::kSpecial, "<|im_start|>"}, {Seg::kText, "assistant\nHello!"},
      {Seg::kSpecial, "<|im_end|>"},   {Seg::kText, "\n"},
      {Seg::kSpecial, "<|im_start|>"}, {Seg::kText, "user\nWhy?"},
      {Seg::kSpecial, "<|im_end|>"},   {Seg::kText, "\n"},
      {Seg::kSpecial, "<|im_start|>"}, {Seg::kText, "assistant\n"}};
  CHECK(FormatChat(ChatFormat::kChatML, kConversation, true).value() == expected);
  // No system prompt: no system turn.
  const std::vector<Seg> plain = {{Seg::kSpecial, "<|im_start|>"}, {Seg::kText, "user\nHi"},
                                  {Seg::kSpecial, "<|im_end|>"},   {Seg::kText, "\n"},
                                  {Seg::kSpecial, "<|im_start|>"}, {Seg::kText, "assistant\n"}};
  CHECK(FormatChatTurn(ChatFormat::kChatML, true, "", "Hi") == plain);
}

TEST_CASE("Llama 3: system + 2 turns", "[chat]") {
  const auto header = [](const char* role) {
    return std::vector<Seg>{{Seg::kSpecial, "<|start_header_id|>"},
                            {Seg::kText, role},
                            {Seg::kSpecial, "<|end_header_id|>"}};
  };
  std::vector<Seg> expected = {{Seg::kBos, ""}};
  const auto add = [&](std::vector<Seg> v) { expected.insert(expected.end(), v.begin(), v.end()); };
  add(header("system"));
  add({{Seg::kText, "\n\nBe brief."}, {Seg::kSpecial, "<|eot_id|>"}});
  add(header("user"));
  add({{Seg::kText, "\n\nHi"}, {Seg::kSpecial, "<|eot_id|>"}});
  add(header("assistant"));
  add({{Seg::kText, "\n\nHello!"}, {Seg::kSpecial, "<|eot_id|>"}});
  add(header("user"));
  add({{Seg::kText, "\n\nWhy?"}, {Seg::kSpecial, "<|eot_id|>"}});
  add(header("assistant"));
  add({{Seg::kText, "\n\n"}});
  // Contents are trimmed, as the template's `| trim` does.
  std::vector<ChatMessage> padded = kConversation;
  padded[1].content = "  Hi\n";
  CHECK(FormatChat(ChatFormat::kLlama3, padded, true).value() == expected);
}

TEST_CASE("Llama 2: system + 2 turns", "[chat]") {
  const std::vector<Seg> expected = {
      {Seg::kBos, ""},
      {Seg::kMarkup, "[INST]"},
      {Seg::kText, " <<SYS>>\nBe brief.\n<</SYS>>\n\nHi "},
      {Seg::kMarkup, "[/INST]"},
      {Seg::kText, " Hello! "},
      {Seg::kSpecial, "</s>"},
      {Seg::kBos, ""},
      {Seg::kMarkup, "[INST]"},
      {Seg::kText, " Why? "},
      {Seg::kMarkup, "[/INST]"}};
  CHECK(FormatChat(ChatFormat::kLlama2, kConversation, true).value() == expected);
}

TEST_CASE("Turn-by-turn prompts concatenate to the whole conversation", "[chat]") {
  for (ChatFormat f : {ChatFormat::kChatML, ChatFormat::kLlama3, ChatFormat::kLlama2}) {
    INFO(ChatFormatName(f));
    // What the chat loop feeds: turn 1, the reply the model wrote (its
    // end-of-turn token sampled, not fed), turn 2 (which starts by closing
    // reply 1 with that token).
    std::vector<ChatMessage> whole = kConversation;
    whole.push_back({"assistant", "Because."});
    const std::vector<Seg> closed = FormatChat(f, whole, false).value();
    std::vector<ChatSegment> pieces;
    const auto add = [&pieces](std::vector<Seg> v) {
      for (Seg& s : v) chat_internal::Add(&pieces, s.kind, std::move(s.text));
    };
    add(FormatChatTurn(f, true, "Be brief.", "Hi"));
    add({{Seg::kText, f == ChatFormat::kLlama2 ? " Hello! " : "Hello!"}});
    add(FormatChatTurn(f, false, "Be brief.", "Why?"));
    add({{Seg::kText, f == ChatFormat::kLlama2 ? " Because. " : "Because."}});
    add({{Seg::kSpecial, ChatEndOfTurn(f)}});
    if (f == ChatFormat::kChatML) add({{Seg::kText, "\n"}});
    CHECK(pieces == closed);
  }
  // Badly ordered conversations are errors, not crashes.
  CHECK(!FormatChat(ChatFormat::kChatML, {{"assistant", "x"}}, true).ok());
  CHECK(!FormatChat(ChatFormat::kChatML, {{"user", "x"}, {"user", "y"}}, true).ok());
  CHECK(!FormatChat(ChatFormat::kChatML, {{"user", "x"}}, false).ok());
  CHECK(!FormatChat(ChatFormat::kChatML, {{"user", "x"}, {"assistant", "y"}}, true).ok());
}

// A character vocabulary: <unk> <s> </s>, the printable ASCII characters
// and \n, then the special pieces of all three families (CONTROL) and
// "[INST]" as a USER_DEFINED token (as Mistral v3 has it), no space prefix.
struct CharVocab {
  Tokenizer tok;
  int first_char = 3;
  int Char(char c) const { return c == '\n' ? first_char + 95 : first_char + (c - ' '); }
  std::vector<int> Text(const std::string& s) const {
    std::vector<int> ids;
    for (char c : s) ids.push_back(Char(c));
    return ids;
  }
};
const char* const kSpecials[] = {"<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                 "<|end_header_id|>", "<|eot_id|>"};

CharVocab MakeCharVocab(bool inst_token) {
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  std::vector<TokenType> types = {TokenType::kUnknown, TokenType::kControl, TokenType::kControl};
  for (char c = ' '; c <= '~'; ++c) pieces.push_back(std::string(1, c)), types.push_back(TokenType::kNormal);
  pieces.push_back("\n");
  types.push_back(TokenType::kNormal);
  for (const char* s : kSpecials) pieces.push_back(s), types.push_back(TokenType::kControl);
  if (inst_token) {
    pieces.push_back("[INST]");
    types.push_back(TokenType::kUserDefined);
  }
  std::vector<float> scores(pieces.size(), 0.0f);
  CharVocab v;
  v.tok = Tokenizer::FromVocab(std::move(pieces), std::move(scores), std::move(types), 1, 2, 0,
                               /*add_space_prefix=*/false)
              .value();
  return v;
}

TEST_CASE("Chat segments to token ids", "[chat]") {
  const CharVocab v = MakeCharVocab(/*inst_token=*/false);
  const ChatTokenizer chat(v.tok);
  const int im_start = 3 + 96, im_end = im_start + 1, header = im_start + 2, header_end = im_start + 3,
            eot = im_start + 4;
  CHECK(chat.Special("<|im_start|>") == im_start);
  CHECK(chat.Special("<|eot_id|>") == eot);
  CHECK(chat.Special("a") == -1);  // normal pieces are not special

  auto cat = [](std::vector<std::vector<int>> parts) {
    std::vector<int> out;
    for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
  };
  // ChatML, first turn with a system prompt. The user's text spells a
  // special piece: it stays text.
  const std::vector<int> chatml =
      chat.Encode(FormatChatTurn(ChatFormat::kChatML, true, "S", "<|im_end|>")).value();
  CHECK(chatml == cat({{im_start}, v.Text("system\nS"), {im_end}, v.Text("\n"), {im_start},
                       v.Text("user\n<|im_end|>"), {im_end}, v.Text("\n"), {im_start},
                       v.Text("assistant\n")}));
  // Llama 3, second turn: closes the reply with <|eot_id|>, no BOS.
  const std::vector<int> llama3 =
      chat.Encode(FormatChatTurn(ChatFormat::kLlama3, false, "S", "Q")).value();
  CHECK(llama3 == cat({{eot, header}, v.Text("user"), {header_end}, v.Text("\n\nQ"), {eot, header},
                       v.Text("assistant"), {header_end}, v.Text("\n\n")}));
  const std::vector<int> llama3_first =
      chat.Encode(FormatChatTurn(ChatFormat::kLlama3, true, "", "Q")).value();
  CHECK(llama3_first.front() == 1);  // BOS
  // Llama 2: [INST] is text here, encoded together with what follows.
  const std::vector<int> llama2 =
      chat.Encode(FormatChatTurn(ChatFormat::kLlama2, false, "S", "Q")).value();
  CHECK(llama2 == cat({{2, 1}, v.Text("[INST] Q [/INST]")}));
  // ... and one token where the vocabulary has it (Mistral).
  const CharVocab m = MakeCharVocab(/*inst_token=*/true);
  const ChatTokenizer mchat(m.tok);
  const int inst = m.tok.vocab_size() - 1;
  CHECK(mchat.Encode(FormatChatTurn(ChatFormat::kLlama2, true, "", "Q")).value() ==
        cat({{1, inst}, m.Text(" Q [/INST]")}));
}

TEST_CASE("Missing special tokens are errors naming them", "[chat]") {
  // llama2.c-style vocabulary: no ChatML or Llama 3 specials.
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>", "a", " "};
  Tokenizer tok = Tokenizer::FromVocab(pieces, std::vector<float>(5, 0.0f), {}, 1, 2, 0).value();
  const ChatTokenizer chat(tok);
  const Status s = chat.Encode(FormatChatTurn(ChatFormat::kChatML, true, "", "a")).status();
  CHECK(s.code() == StatusCode::kNotFound);
  CHECK(Contains(s.message(), "'<|im_start|>'"));
  CHECK(Contains(s.message(), "--chat-template"));
  CHECK(chat.Encode(FormatChatTurn(ChatFormat::kLlama2, true, "", "a")).ok());
  // No BOS in the vocabulary: a family that needs it fails clearly.
  Tokenizer nobos = Tokenizer::FromVocab(pieces, std::vector<float>(5, 0.0f), {}, -1, 2, 0).value();
  const Status b = ChatTokenizer(nobos).Encode(FormatChatTurn(ChatFormat::kLlama2, true, "", "a")).status();
  CHECK(Contains(b.message(), "BOS"));
}

TEST_CASE("Llama 2 chat on the shared Llama 2 vocabulary", "[chat][shared]") {
  const std::string models = test::SharedModelsDir();
  if (models.empty()) SKIP("../shared/models not found");
  const std::string path = models + "/../vocab/ggml-vocab-llama-spm.gguf";
  StatusOr<GgufFile> gguf = GgufFile::Open(path);
  if (!gguf.ok()) SKIP(path + " not found");
  const Tokenizer tok = Tokenizer::FromGguf(gguf->reader()).value();
  const ChatTokenizer chat(tok);
  CHECK(chat.Special("<s>") == 1);
  CHECK(chat.Special("</s>") == 2);
  // "<s>[INST] Hi [/INST]": BOS, then the text with its one space prefix,
  // which is what Encode gives the same text after BOS.
  const std::vector<int> ids =
      chat.Encode(FormatChatTurn(ChatFormat::kLlama2, true, "", "Hi")).value();
  CHECK(ids == tok.Encode("[INST] Hi [/INST]", /*add_bos=*/true).value());
  CHECK(ids.size() > 4);
  CHECK(Contains(chat.Encode(FormatChatTurn(ChatFormat::kChatML, true, "", "Hi")).status().message(),
                 "<|im_start|>"));
}

}  // namespace
}  // namespace lutra
