package fakeanthropic

import (
	"bytes"
	"encoding/json"
	"errors"
)

// Token-count constants of CountTokens.
const (
	framingTokens    = 8 // every request, however short
	perMessageTokens = 4 // role and turn markers of each message
)

// CountTokens returns the input-token count of a Messages request body, as the
// fake uses it everywhere: usage.input_tokens, ITPM accounting and
// /v1/messages/count_tokens. The formula is deterministic:
//
//	8 (framing)
//	+ ceil(compact JSON bytes / 4) for each entry of tools
//	+ ceil(utf8 bytes / 4) for the system prompt (a string or each text block)
//	+ for each message: 4 + for its content, ceil(utf8 bytes / 4) of a string,
//	  or per block ceil(bytes / 4) of its text for a text block and of its
//	  compact JSON for any other block (image, tool_use, tool_result, ...)
//
// A cache_control member costs nothing: a tool or a non-text block counts
// by its compact JSON without it. tool_choice and other fields do not count.
// Caching does not change the count. The body must be a JSON object;
// tools, system and messages, when present, must have the shapes the API
// accepts. Other fields are not checked.
func CountTokens(body []byte) (int, error) {
	var top struct {
		Tools    json.RawMessage `json:"tools"`
		System   json.RawMessage `json:"system"`
		Messages json.RawMessage `json:"messages"`
	}
	if err := json.Unmarshal(body, &top); err != nil {
		return 0, errors.New("request body is not a valid JSON object")
	}
	system, apiErr := parseSystem(top.System)
	if apiErr != nil {
		return 0, errors.New(apiErr.message)
	}
	tools, apiErr := parseTools(top.Tools)
	if apiErr != nil {
		return 0, errors.New(apiErr.message)
	}
	var turns []turn
	if !isNull(top.Messages) {
		if turns, apiErr = parseMessages(top.Messages); apiErr != nil {
			return 0, errors.New(apiErr.message)
		}
	}
	return countPrompt(tools, system, turns), nil
}

// block is one content block of a prompt (a string content is one text
// block), or one entry of tools (typ "tool").
type block struct {
	typ   string
	text  string        // text blocks
	raw   []byte        // compact JSON, without cache_control, of every other block
	cache *cacheControl // its cache breakpoint, if any
}

// turn is one message of a prompt.
type turn struct {
	role   string
	blocks []block
}

func countPrompt(tools, system []block, turns []turn) int {
	n := framingTokens + countBlocks(tools) + countBlocks(system)
	for _, t := range turns {
		n += perMessageTokens + countBlocks(t.blocks)
	}
	return n
}

func countBlocks(blocks []block) int {
	n := 0
	for _, b := range blocks {
		n += b.tokens()
	}
	return n
}

// tokens is the block's share of CountTokens.
func (b block) tokens() int {
	if b.typ == "text" {
		return ceilQuarter(len(b.text))
	}
	return ceilQuarter(len(b.raw))
}

func ceilQuarter(n int) int { return (n + 3) / 4 }

func isNull(raw json.RawMessage) bool {
	return len(raw) == 0 || bytes.Equal(bytes.TrimSpace(raw), []byte("null"))
}
