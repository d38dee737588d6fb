// Chat prompts for instruction-tuned models: recognises the family of a
// model's `tokenizer.chat_template` (a Jinja2 program in GGUF metadata) by
// its signature, and formats conversations the way that family's template
// does, as segments of plain text and special-token strings, which are then
// turned into token ids without parsing special tokens out of user text.
//
// lutra does not run Jinja: the three families below cover most small chat
// models (Qwen, SmolLM2, Phi-3.5 ChatML variants; Llama 3.x; Llama 2 and
// Mistral), and a template that is none of them is an error naming it.
#ifndef LUTRA_RUNTIME_CHAT_TEMPLATE_H_
#define LUTRA_RUNTIME_CHAT_TEMPLATE_H_

#include <stddef.h>

#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "lutra/base/status.h"
#include "lutra/format/tokenizer.h"

namespace lutra {

enum class ChatFormat {
  kChatML,  // <|im_start|>role\ncontent<|im_end|>\n
  kLlama3,  // <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
  kLlama2,  // <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] reply </s>
};

// Each family's --chat-template name and the special token that ends an
// assistant turn (for Llama 2, EOS "</s>"): generation stops when the model
// samples it. Indexed by ChatFormat.
struct ChatFormatInfo {
  const char* name;
  const char* end_of_turn;
};
inline constexpr ChatFormatInfo kChatFormats[] = {
    {"chatml", "<|im_end|>"}, {"llama3", "<|eot_id|>"}, {"llama2", "</s>"}};

inline const char* ChatFormatName(ChatFormat f) { return kChatFormats[int(f)].name; }
inline const char* ChatEndOfTurn(ChatFormat f) { return kChatFormats[int(f)].end_of_turn; }

// "chatml", "llama3" or "llama2" (the --chat-template names).
inline StatusOr<ChatFormat> ParseChatFormat(std::string_view name) {
  for (ChatFormat f : {ChatFormat::kChatML, ChatFormat::kLlama3, ChatFormat::kLlama2}) {
    if (name == ChatFormatName(f)) return f;
  }
  return InvalidArgument("chat template '%s': expected chatml, llama3 or llama2",
                         std::string(name).c_str());
}

// The family of a tokenizer.chat_template by the special strings only that
// family's template writes. An empty or unrecognised template is an error
// quoting its first 60 characters (newlines shown as \n).
inline StatusOr<ChatFormat> DetectChatFormat(std::string_view jinja) {
  if (jinja.find("<|im_start|>") != std::string_view::npos) return ChatFormat::kChatML;
  if (jinja.find("<|start_header_id|>") != std::string_view::npos) return ChatFormat::kLlama3;
  if (jinja.find("[INST]") != std::string_view::npos) return ChatFormat::kLlama2;
  if (jinja.empty()) {
    return NotFound("the model has no tokenizer.chat_template: give --chat-template "
                    "chatml|llama3|llama2");
  }
  std::string head;
  for (size_t i = 0; i < jinja.size() && i < 60; ++i) {
    if (jinja[i] == '\n') {
      head += "\\n";
    } else {
      head += jinja[i];
    }
  }
  return InvalidArgument("chat template not recognised (not ChatML, Llama 3 or Llama 2): "
                         "'%s%s'; give --chat-template chatml|llama3|llama2",
                         head.c_str(), jinja.size() > 60 ? "..." : "");
}

// A piece of a formatted chat prompt.
struct ChatSegment {
  enum Kind {
    kText,     // user or template text, tokenized as text
    kSpecial,  // a special token's exact piece, e.g. "<|im_start|>": must exist
    kMarkup,   // template text that some vocabularies have as one special
               // token (Mistral's "[INST]"), others as plain text (Llama 2)
    kBos,      // the vocabulary's BOS token
  };
  Kind kind;
  std::string text;  // empty for kBos

  bool operator==(const ChatSegment& o) const { return kind == o.kind && text == o.text; }
};

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

namespace chat_internal {

inline std::string Trim(std::string_view s) {
  const char* ws = " \t\n\r";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return "";
  return std::string(s.substr(b, s.find_last_not_of(ws) - b + 1));
}

inline void Add(std::vector<ChatSegment>* out, ChatSegment::Kind kind, std::string text) {
  // Adjacent text segments merge, so each runs through the tokenizer once.
  if (kind == ChatSegment::kText && !out->empty() && out->back().kind == ChatSegment::kText) {
    out->back().text += text;
  } else if (kind != ChatSegment::kText || !text.empty()) {
    out->push_back({kind, std::move(text)});
  }
}

}  // namespace chat_internal

// Segments of the prompt for one new user turn, ending with the assistant
// header the reply follows (the generation prompt). `first`: the
// conversation starts here (BOS where the family has one, and the system
// prompt, if not empty); otherwise the segments first close the previous
// assistant reply (its end-of-turn token, which generation stops at without
// feeding it to the model). So a conversation's prompt is the concatenation
// of FormatChatTurn(first) + reply 1 + FormatChatTurn(!first) + reply 2 ...,
// which is what FormatChat builds.
//
// Contents are used verbatim (ChatML) or trimmed (Llama 3 and 2, as their
// templates do).
inline std::vector<ChatSegment> FormatChatTurn(ChatFormat f, bool first, std::string_view system,
                                               std::string_view user) {
  using chat_internal::Add;
  using chat_internal::Trim;
  std::vector<ChatSegment> s;
  switch (f) {
    case ChatFormat::kChatML:
      if (!first) {
        Add(&s, ChatSegment::kSpecial, "<|im_end|>");
        Add(&s, ChatSegment::kText, "\n");
      }
      if (first && !system.empty()) {
        Add(&s, ChatSegment::kSpecial, "<|im_start|>");
        Add(&s, ChatSegment::kText, "system\n" + std::string(system));
        Add(&s, ChatSegment::kSpecial, "<|im_end|>");
        Add(&s, ChatSegment::kText, "\n");
      }
      Add(&s, ChatSegment::kSpecial, "<|im_start|>");
      Add(&s, ChatSegment::kText, "user\n" + std::string(user));
      Add(&s, ChatSegment::kSpecial, "<|im_end|>");
      Add(&s, ChatSegment::kText, "\n");
      Add(&s, ChatSegment::kSpecial, "<|im_start|>");
      Add(&s, ChatSegment::kText, "assistant\n");
      break;
    case ChatFormat::kLlama3: {
      const auto header = [&s](const char* role) {
        Add(&s, ChatSegment::kSpecial, "<|start_header_id|>");
        Add(&s, ChatSegment::kText, role);
        Add(&s, ChatSegment::kSpecial, "<|end_header_id|>");
        Add(&s, ChatSegment::kText, "\n\n");
      };
      if (first) {
        Add(&s, ChatSegment::kBos, "");
      } else {
        Add(&s, ChatSegment::kSpecial, "<|eot_id|>");
      }
      if (first && !system.empty()) {
        header("system");
        Add(&s, ChatSegment::kText, Trim(system));
        Add(&s, ChatSegment::kSpecial, "<|eot_id|>");
      }
      header("user");
      Add(&s, ChatSegment::kText, Trim(user));
      Add(&s, ChatSegment::kSpecial, "<|eot_id|>");
      header("assistant");
      break;
    }
    case ChatFormat::kLlama2: {
      // Meta's template: the system prompt goes inside the first [INST].
      if (!first) Add(&s, ChatSegment::kSpecial, "</s>");
      Add(&s, ChatSegment::kBos, "");
      Add(&s, ChatSegment::kMarkup, "[INST]");
      std::string content = " ";
      if (first && !system.empty()) {
        content += "<<SYS>>\n" + Trim(system) + "\n<</SYS>>\n\n";
      }
      Add(&s, ChatSegment::kText, content + Trim(user) + " ");
      Add(&s, ChatSegment::kMarkup, "[/INST]");
      break;
    }
  }
  return s;
}

// Segments of a whole conversation: an optional leading "system" message,
// then alternating "user" and "assistant" messages; with
// `add_generation_prompt`, ending in an open assistant turn (the last
// message must then be a user's), else closed after the last reply.
inline StatusOr<std::vector<ChatSegment>> FormatChat(ChatFormat f,
                                                     const std::vector<ChatMessage>& messages,
                                                     bool add_generation_prompt) {
  size_t i = 0;
  std::string_view system;
  if (!messages.empty() && messages[0].role == "system") system = messages[i++].content;
  std::vector<ChatSegment> out;
  for (bool first = true; i < messages.size(); first = false) {
    if (messages[i].role != "user") {
      return InvalidArgument("chat: message %zu is '%s', expected 'user'", i,
                             messages[i].role.c_str());
    }
    for (ChatSegment& seg : FormatChatTurn(f, first, system, messages[i].content)) {
      chat_internal::Add(&out, seg.kind, std::move(seg.text));
    }
    ++i;
    if (i == messages.size()) {
      if (!add_generation_prompt) {
        return InvalidArgument("chat: the conversation ends with a user message: pass "
                               "add_generation_prompt");
      }
      return out;
    }
    if (messages[i].role != "assistant") {
      return InvalidArgument("chat: message %zu is '%s', expected 'assistant'", i,
                             messages[i].role.c_str());
    }
    // The reply as the model writes it: Llama 2's template puts a space
    // before it (" reply </s>"); the others follow the header directly.
    const std::string reply = f == ChatFormat::kLlama2
                                  ? " " + chat_internal::Trim(messages[i].content) + " "
                              : f == ChatFormat::kLlama3 ? chat_internal::Trim(messages[i].content)
                                                         : messages[i].content;
    chat_internal::Add(&out, ChatSegment::kText, reply);
    ++i;
  }
  if (add_generation_prompt) {
    return InvalidArgument("chat: add_generation_prompt needs a last message from the user");
  }
  // Close the last reply as the next turn would.
  out.push_back({ChatSegment::kSpecial, ChatEndOfTurn(f)});
  if (f == ChatFormat::kChatML) chat_internal::Add(&out, ChatSegment::kText, "\n");
  return out;
}

// Maps special-token pieces (CONTROL and USER_DEFINED tokens) to ids, once
// per vocabulary, and turns chat segments into token ids.
class ChatTokenizer {
 public:
  explicit ChatTokenizer(const Tokenizer& tok) : tok_(&tok) {
    for (int id = 0; id < tok.vocab_size(); ++id) {
      const TokenType t = tok.type(id);
      if (t == TokenType::kControl || t == TokenType::kUserDefined) {
        special_.emplace(tok.piece(id), id);  // the first id of a piece wins
      }
    }
  }

  // Id of a special token's piece, or -1.
  int Special(std::string_view piece) const {
    auto it = special_.find(std::string(piece));
    return it == special_.end() ? -1 : it->second;
  }

  // Token ids of `segments`. Runs of text (and markup that is not a special
  // token here) are encoded together without BOS, so each run gets the
  // vocabulary's space prefix once, as llama.cpp's tokenizer gives each text
  // fragment between special tokens. A kSpecial piece missing from the
  // vocabulary is an error naming it.
  StatusOr<std::vector<int>> Encode(const std::vector<ChatSegment>& segments) const {
    std::vector<int> ids;
    std::string pending;
    auto flush = [&]() -> Status {
      if (pending.empty()) return Status();
      StatusOr<std::vector<int>> t = tok_->Encode(pending, /*add_bos=*/false);
      if (!t.ok()) return t.status();
      ids.insert(ids.end(), t->begin(), t->end());
      pending.clear();
      return Status();
    };
    for (const ChatSegment& seg : segments) {
      int id = -1;
      switch (seg.kind) {
        case ChatSegment::kText:
          pending += seg.text;
          continue;
        case ChatSegment::kMarkup:
          id = Special(seg.text);
          if (id < 0) {
            pending += seg.text;
            continue;
          }
          break;
        case ChatSegment::kSpecial:
          id = Special(seg.text);
          if (id < 0) {
            return NotFound("chat: the vocabulary has no special token '%s' (wrong "
                            "--chat-template for this model?)",
                            seg.text.c_str());
          }
          break;
        case ChatSegment::kBos:
          id = tok_->bos_id();
          if (id < 0) return NotFound("chat: the template starts with BOS, the vocabulary has none");
          break;
      }
      LUTRA_RETURN_IF_ERROR(flush());
      ids.push_back(id);
    }
    LUTRA_RETURN_IF_ERROR(flush());
    return ids;
  }

 private:
  const Tokenizer* tok_;
  std::unordered_map<std::string, int> special_;
};

}  // namespace lutra

#endif  // LUTRA_RUNTIME_CHAT_TEMPLATE_H_
