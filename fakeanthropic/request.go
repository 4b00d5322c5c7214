package fakeanthropic

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// maxBreakpoints is how many cache_control blocks a request may carry.
const maxBreakpoints = 4

// messagesRequest is a validated Messages (or count_tokens) request body.
type messagesRequest struct {
	model         string
	maxTokens     int
	stream        bool
	userID        string
	stopSequences []string
	tools         []block // each a "tool" block: its compact JSON
	system        []block
	turns         []turn
	toolDefs      []toolDef // the tools, by name and input_schema
	toolChoice    toolChoice
	thinking      *thinkingParam // nil: thinking off

	inputTokens int // CountTokens of the body
	directives  directives
}

// directives are the [[name=N]] markers of the last user message, with
// which a prompt steers the fake. -1 means absent.
type directives struct {
	replyTokens int // [[reply_tokens=N]]: reply length in output tokens
	cacheRead   int // [[cache_read=N]]: cache_read_input_tokens
	cacheWrite  int // [[cache_write=N]]: cache_creation_input_tokens
	latencyMS   int // [[latency_ms=N]]: more wait before the answer begins
	// thinkingTokens ([[thinking_tokens=N]]): the thinking block's length
	// when thinking is enabled.
	thinkingTokens int
	// toolUse ([[tool_use=NAME]]): call tool NAME; toolUseAny
	// ([[tool_use]]): call the first tool.
	toolUse    string
	toolUseAny bool
	// citations ([[citations]]): the text block ends with a citations_delta.
	citations bool
	// unknownEvent ([[unknown_event]]): an event and a block of types no
	// client knows.
	unknownEvent bool
	// redactedThinking ([[redacted_thinking]]): a redacted_thinking block
	// after the thinking block.
	redactedThinking bool
	// deltaFields ([[delta_fields]]): message_delta's delta (and the whole
	// message) carries fields beyond stop_reason and stop_sequence.
	deltaFields bool
}

var (
	directiveRE = regexp.MustCompile(`\[\[(reply_tokens|cache_read|cache_write|latency_ms|thinking_tokens)=(\d{1,9})\]\]`)
	flagRE      = regexp.MustCompile(`\[\[(tool_use|citations|unknown_event|redacted_thinking|delta_fields)(?:=([A-Za-z0-9_-]{1,64}))?\]\]`)
)

// parseRequest validates body the way the API does and reports the first
// problem as a 400 invalid_request_error with the field's path, in the
// wording of the real API. count_tokens requests carry no max_tokens.
func parseRequest(body []byte, countOnly bool) (*messagesRequest, *apiError) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil || fields == nil {
		return nil, invalidRequest("There was an issue with your request body: it is not a valid JSON object.")
	}
	req := &messagesRequest{}

	raw, ok := fields["model"]
	if !ok || isNull(raw) {
		return nil, invalidRequest("model: Field required")
	}
	if json.Unmarshal(raw, &req.model) != nil {
		return nil, invalidRequest("model: Input should be a valid string")
	}
	if req.model == "" {
		return nil, invalidRequest("model: String should have at least 1 character")
	}

	if !countOnly {
		raw, ok = fields["max_tokens"]
		if !ok || isNull(raw) {
			return nil, invalidRequest("max_tokens: Field required")
		}
		n, err := parseInt(raw)
		if err != nil {
			return nil, invalidRequest("max_tokens: Input should be a valid integer")
		}
		if n < 1 {
			return nil, invalidRequest("max_tokens: Input should be greater than or equal to 1")
		}
		req.maxTokens = n
	}

	raw, ok = fields["messages"]
	if !ok || isNull(raw) {
		return nil, invalidRequest("messages: Field required")
	}
	var apiErr *apiError
	if req.turns, apiErr = parseMessages(raw); apiErr != nil {
		return nil, apiErr
	}
	if len(req.turns) == 0 {
		return nil, invalidRequest("messages: at least one message is required")
	}
	if req.system, apiErr = parseSystem(fields["system"]); apiErr != nil {
		return nil, apiErr
	}
	if req.tools, apiErr = parseTools(fields["tools"]); apiErr != nil {
		return nil, apiErr
	}
	if req.toolDefs, apiErr = parseToolDefs(fields["tools"], req.tools); apiErr != nil {
		return nil, apiErr
	}
	if req.toolChoice, apiErr = parseToolChoice(fields["tool_choice"], req.toolDefs); apiErr != nil {
		return nil, apiErr
	}
	if req.thinking, apiErr = parseThinking(fields["thinking"], req.maxTokens, countOnly); apiErr != nil {
		return nil, apiErr
	}
	if req.thinking != nil && (req.toolChoice.typ == "any" || req.toolChoice.typ == "tool") {
		return nil, invalidRequest("Thinking may not be enabled when tool_choice forces tool use.")
	}
	if apiErr = checkConversation(req.turns); apiErr != nil {
		return nil, apiErr
	}
	if n := countBreakpoints(req.tools, req.system, req.turns); n > maxBreakpoints && !countOnly {
		return nil, invalidRequest("A maximum of %d blocks with cache_control may be provided. Found %d.", maxBreakpoints, n)
	}

	if raw := fields["stream"]; !isNull(raw) {
		if json.Unmarshal(raw, &req.stream) != nil {
			return nil, invalidRequest("stream: Input should be a valid boolean")
		}
	}
	if raw := fields["metadata"]; !isNull(raw) {
		var md map[string]json.RawMessage
		if json.Unmarshal(raw, &md) != nil {
			return nil, invalidRequest("metadata: Input should be a valid dictionary")
		}
		if raw := md["user_id"]; !isNull(raw) {
			if json.Unmarshal(raw, &req.userID) != nil {
				return nil, invalidRequest("metadata.user_id: Input should be a valid string")
			}
		}
	}
	if raw := fields["stop_sequences"]; !isNull(raw) {
		if json.Unmarshal(raw, &req.stopSequences) != nil {
			return nil, invalidRequest("stop_sequences: Input should be a valid list of strings")
		}
	}

	req.inputTokens = countPrompt(req.tools, req.system, req.turns)
	req.directives = parseDirectives(lastUserText(req.turns))
	return req, nil
}

// parseInt accepts a JSON number with an integral value (100 or 100.0).
func parseInt(raw json.RawMessage) (int, error) {
	var f float64
	if err := json.Unmarshal(raw, &f); err != nil {
		return 0, err
	}
	if f != float64(int64(f)) || f > 1<<40 || f < -(1<<40) {
		return 0, fmt.Errorf("not an integer: %s", raw)
	}
	return int(f), nil
}

// parseTools parses the optional tools list: each an object, counted and
// cached by its compact JSON (without cache_control).
func parseTools(raw json.RawMessage) ([]block, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var items []json.RawMessage
	if json.Unmarshal(raw, &items) != nil {
		return nil, invalidRequest("tools: Input should be a valid list")
	}
	tools := make([]block, 0, len(items))
	for i, item := range items {
		at := fmt.Sprintf("tools.%d", i)
		var m map[string]json.RawMessage
		if json.Unmarshal(item, &m) != nil || m == nil {
			return nil, invalidRequest("%s: Input should be a valid dictionary", at)
		}
		b := block{typ: "tool"}
		var apiErr *apiError
		if b.cache, b.raw, apiErr = cacheControlOf(m, item, at); apiErr != nil {
			return nil, apiErr
		}
		tools = append(tools, b)
	}
	return tools, nil
}

// cacheControlOf reads the cache_control of a block or tool (m, whose JSON
// is raw) and returns it with the compact JSON of the object without it.
func cacheControlOf(m map[string]json.RawMessage, raw json.RawMessage, at string) (*cacheControl, []byte, *apiError) {
	cc, apiErr := parseCacheControl(m["cache_control"], at)
	if apiErr != nil {
		return nil, nil, apiErr
	}
	var compact bytes.Buffer
	if _, ok := m["cache_control"]; ok {
		// Keys sorted, HTML left alone: the length is that of the compact
		// original without its cache_control member.
		delete(m, "cache_control")
		enc := json.NewEncoder(&compact)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(m); err != nil {
			return nil, nil, invalidRequest("%s: Input should be a valid dictionary", at)
		}
		return cc, bytes.TrimSuffix(compact.Bytes(), []byte("\n")), nil
	}
	if err := json.Compact(&compact, raw); err != nil {
		return nil, nil, invalidRequest("%s: Input should be a valid dictionary", at)
	}
	return cc, compact.Bytes(), nil
}

// cacheControl is a cache breakpoint: {"type":"ephemeral","ttl":"5m"|"1h"}.
type cacheControl struct {
	ttl time.Duration
}

// Cache lifetimes of the two ttl values.
const (
	cacheTTL5m = 5 * time.Minute
	cacheTTL1h = time.Hour
)

// parseCacheControl parses an optional cache_control (null or absent: none).
func parseCacheControl(raw json.RawMessage, at string) (*cacheControl, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	at += ".cache_control"
	var m map[string]json.RawMessage
	if json.Unmarshal(raw, &m) != nil || m == nil {
		return nil, invalidRequest("%s: Input should be a valid dictionary", at)
	}
	var typ string
	if rawType, ok := m["type"]; !ok || isNull(rawType) {
		return nil, invalidRequest("%s.type: Field required", at)
	} else if json.Unmarshal(rawType, &typ) != nil || typ != "ephemeral" {
		return nil, invalidRequest("%s.type: Input should be 'ephemeral'", at)
	}
	cc := &cacheControl{ttl: cacheTTL5m}
	if rawTTL := m["ttl"]; !isNull(rawTTL) {
		var ttl string
		_ = json.Unmarshal(rawTTL, &ttl)
		switch ttl {
		case "5m":
		case "1h":
			cc.ttl = cacheTTL1h
		default:
			return nil, invalidRequest("%s.ttl: Input should be '5m' or '1h'", at)
		}
	}
	return cc, nil
}

// countBreakpoints counts the blocks with a cache_control.
func countBreakpoints(tools, system []block, turns []turn) int {
	n := 0
	count := func(blocks []block) {
		for _, b := range blocks {
			if b.cache != nil {
				n++
			}
		}
	}
	count(tools)
	count(system)
	for _, t := range turns {
		count(t.blocks)
	}
	return n
}

// parseSystem parses the optional system prompt: a string or a list of text
// blocks.
func parseSystem(raw json.RawMessage) ([]block, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return []block{{typ: "text", text: s}}, nil
	}
	var items []json.RawMessage
	if json.Unmarshal(raw, &items) != nil {
		return nil, invalidRequest("system: Input should be a valid string or a list of text blocks")
	}
	blocks := make([]block, 0, len(items))
	for i, item := range items {
		b, apiErr := parseBlock(item, fmt.Sprintf("system.%d", i))
		if apiErr != nil {
			return nil, apiErr
		}
		if b.typ != "text" {
			return nil, invalidRequest("system.%d.type: Input should be 'text'", i)
		}
		blocks = append(blocks, b)
	}
	return blocks, nil
}

// parseMessages parses the messages list: each an object with role user or
// assistant and content a string or a list of content blocks.
func parseMessages(raw json.RawMessage) ([]turn, *apiError) {
	var items []json.RawMessage
	if json.Unmarshal(raw, &items) != nil {
		return nil, invalidRequest("messages: Input should be a valid list")
	}
	turns := make([]turn, 0, len(items))
	for i, item := range items {
		var m map[string]json.RawMessage
		if json.Unmarshal(item, &m) != nil || m == nil {
			return nil, invalidRequest("messages.%d: Input should be a valid dictionary", i)
		}
		var t turn
		if rawRole, ok := m["role"]; !ok || isNull(rawRole) {
			return nil, invalidRequest("messages.%d.role: Field required", i)
		} else if json.Unmarshal(rawRole, &t.role) != nil || (t.role != "user" && t.role != "assistant") {
			return nil, invalidRequest("messages.%d.role: Input should be 'user' or 'assistant'", i)
		}
		content, ok := m["content"]
		if !ok || isNull(content) {
			return nil, invalidRequest("messages.%d.content: Field required", i)
		}
		var s string
		if json.Unmarshal(content, &s) == nil {
			t.blocks = []block{{typ: "text", text: s}}
			turns = append(turns, t)
			continue
		}
		var rawBlocks []json.RawMessage
		if json.Unmarshal(content, &rawBlocks) != nil {
			return nil, invalidRequest("messages.%d.content: Input should be a valid string or a list of content blocks", i)
		}
		t.blocks = make([]block, 0, len(rawBlocks))
		for j, rb := range rawBlocks {
			b, apiErr := parseBlock(rb, fmt.Sprintf("messages.%d.content.%d", i, j))
			if apiErr != nil {
				return nil, apiErr
			}
			t.blocks = append(t.blocks, b)
		}
		turns = append(turns, t)
	}
	return turns, nil
}

// parseBlock parses one content block: an object with a string type and an
// optional cache_control; a text block also needs a string text.
func parseBlock(raw json.RawMessage, at string) (block, *apiError) {
	var m map[string]json.RawMessage
	if json.Unmarshal(raw, &m) != nil || m == nil {
		return block{}, invalidRequest("%s: Input should be a valid dictionary", at)
	}
	var b block
	if rawType, ok := m["type"]; !ok || isNull(rawType) {
		return block{}, invalidRequest("%s.type: Field required", at)
	} else if json.Unmarshal(rawType, &b.typ) != nil {
		return block{}, invalidRequest("%s.type: Input should be a valid string", at)
	}
	if b.typ == "text" {
		if rawText, ok := m["text"]; !ok || isNull(rawText) {
			return block{}, invalidRequest("%s.text: Field required", at)
		} else if json.Unmarshal(rawText, &b.text) != nil {
			return block{}, invalidRequest("%s.text: Input should be a valid string", at)
		}
		var apiErr *apiError
		if b.cache, apiErr = parseCacheControl(m["cache_control"], at); apiErr != nil {
			return block{}, apiErr
		}
		return b, nil
	}
	var apiErr *apiError
	if b.cache, b.raw, apiErr = cacheControlOf(m, raw, at); apiErr != nil {
		return block{}, apiErr
	}
	return b, nil
}

// lastUserText is the text of the last user message, its text blocks (and
// the texts of its tool results) joined by newlines.
func lastUserText(turns []turn) string {
	for i := len(turns) - 1; i >= 0; i-- {
		if turns[i].role != "user" {
			continue
		}
		var texts []string
		for _, b := range turns[i].blocks {
			switch b.typ {
			case "text":
				texts = append(texts, b.text)
			case "tool_result":
				texts = append(texts, toolResultTexts(b.raw)...)
			}
		}
		return strings.Join(texts, "\n")
	}
	return ""
}

func parseDirectives(text string) directives {
	d := directives{replyTokens: -1, cacheRead: -1, cacheWrite: -1, latencyMS: -1, thinkingTokens: -1}
	for _, m := range flagRE.FindAllStringSubmatch(text, -1) {
		switch m[1] {
		case "tool_use":
			d.toolUse, d.toolUseAny = m[2], m[2] == ""
		case "citations":
			d.citations = true
		case "unknown_event":
			d.unknownEvent = true
		case "redacted_thinking":
			d.redactedThinking = true
		case "delta_fields":
			d.deltaFields = true
		}
	}
	for _, m := range directiveRE.FindAllStringSubmatch(text, -1) {
		n, err := strconv.Atoi(m[2])
		if err != nil {
			continue
		}
		switch m[1] {
		case "reply_tokens":
			d.replyTokens = n
		case "cache_read":
			d.cacheRead = n
		case "cache_write":
			d.cacheWrite = n
		case "latency_ms":
			d.latencyMS = n
		case "thinking_tokens":
			d.thinkingTokens = n
		}
	}
	return d
}
