package fakeanthropic

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"sort"
	"strings"
	"unicode/utf8"
)

// replyWords are the output tokens of every reply, cycled. Each token is one
// word and a space, so that text deltas, words and usage.output_tokens all
// agree.
var replyWords = strings.Fields(`
	sure here is a short answer from the fake model which streams one word per
	token so that every client can count what it receives and check usage
	against the text the rate limits are real the words are not please keep
	calm and carry on queueing fairly while the buckets refill at their steady
	pace`)

// Stop reasons.
const (
	stopEndTurn      = "end_turn"
	stopMaxTokens    = "max_tokens"
	stopStopSequence = "stop_sequence"
	stopToolUse      = "tool_use"
)

// defaultThinkingTokens is the length of a thinking block without
// [[thinking_tokens=N]] (capped by budget_tokens).
const defaultThinkingTokens = 8

// toolInputPiece is the most bytes of a tool's input JSON one
// input_json_delta (one output token) carries.
const toolInputPiece = 8

// reply is the planned answer to one request: its content blocks, each
// produced delta by delta, and why it stops.
type reply struct {
	blocks       []replyBlock
	stopReason   string
	stopSequence *string
	// unknownEvent ([[unknown_event]]): an event of a type no client
	// knows (content_block_future) follows message_start.
	unknownEvent bool
	// extras ([[delta_fields]]): fields beyond stop_reason and
	// stop_sequence in message_delta's delta and the whole message.
	extras *deltaExtras
}

// deltaExtras are the fields a reply with [[delta_fields]] adds to
// message_delta's delta, and the whole message to its top level:
// stop_details (null, as the API sends it when the stop has nothing more
// to say), a container, and a field of a name no client knows.
type deltaExtras struct {
	container   containerInfo
	futureField futureField
}

// containerExpiry is the expiry of every container the fake reports.
const containerExpiry = "2030-01-01T00:00:00Z"

// end fills in how msg stops: its stop reason and sequence and, with
// [[delta_fields]], the fields beyond them.
func (r reply) end(msg *message) {
	msg.StopReason = &r.stopReason
	msg.StopSequence = r.stopSequence
	if r.extras != nil {
		msg.StopDetails = json.RawMessage("null")
		msg.Container = &r.extras.container
		msg.FutureField = &r.extras.futureField
		msg.ContextManagement = r.contextManagement()
	}
}

// delta is the delta of the reply's message_delta.
// contextManagement is what a reply with [[delta_fields]] reports of
// context management (no edit applied); nil without.
func (r reply) contextManagement() json.RawMessage {
	if r.extras == nil {
		return nil
	}
	return json.RawMessage(`{"applied_edits":[]}`)
}

func (r reply) delta() messageDelta {
	d := messageDelta{StopReason: &r.stopReason, StopSequence: r.stopSequence}
	if r.extras != nil {
		d.StopDetails = json.RawMessage("null")
		d.Container = &r.extras.container
		d.FutureField = &r.extras.futureField
	}
	return d
}

// replyBlock is one content block: how content_block_start shows it, its
// deltas in order, and the whole block as a non-streaming message holds it.
type replyBlock struct {
	start  any
	deltas []replyDelta
	whole  any
}

// replyDelta is the delta of one content_block_delta; token: it is an
// output token (paced, counted in usage), else it is free (an empty first
// input_json_delta, a signature, a citation).
type replyDelta struct {
	delta any
	token bool
}

// tokens is the reply's output tokens.
func (r reply) tokens() int {
	n := 0
	for _, b := range r.blocks {
		for _, d := range b.deltas {
			if d.token {
				n++
			}
		}
	}
	return n
}

// Wire types of content blocks and deltas, in the API's field order.
type (
	textBlock struct {
		Type      string `json:"type"`
		Text      string `json:"text"`
		Citations []any  `json:"citations,omitempty"`
	}
	thinkingBlock struct {
		Type      string `json:"type"`
		Thinking  string `json:"thinking"`
		Signature string `json:"signature"`
	}
	redactedThinkingBlock struct {
		Type string `json:"type"`
		Data string `json:"data"`
	}
	toolUseBlock struct {
		Type  string          `json:"type"`
		ID    string          `json:"id"`
		Name  string          `json:"name"`
		Input json.RawMessage `json:"input"`
	}
	// containerInfo is the container a message reports ([[delta_fields]]).
	containerInfo struct {
		ID        string `json:"id"`
		ExpiresAt string `json:"expires_at"`
		Skills    []any  `json:"skills"`
	}
	// futureField is a message field no client knows ([[delta_fields]]).
	futureField struct {
		Detail string `json:"detail"`
	}
	// futureBlock is a block type no client knows ([[unknown_event]]).
	futureBlock struct {
		Type   string `json:"type"`
		Detail string `json:"detail"`
	}
	textDelta struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	inputJSONDelta struct {
		Type        string `json:"type"`
		PartialJSON string `json:"partial_json"`
	}
	thinkingDelta struct {
		Type     string `json:"type"`
		Thinking string `json:"thinking"`
	}
	signatureDelta struct {
		Type      string `json:"type"`
		Signature string `json:"signature"`
	}
	citationsDelta struct {
		Type     string   `json:"type"`
		Citation citation `json:"citation"`
	}
	citation struct {
		Type           string  `json:"type"`
		CitedText      string  `json:"cited_text"`
		DocumentIndex  int     `json:"document_index"`
		DocumentTitle  *string `json:"document_title"`
		StartCharIndex int     `json:"start_char_index"`
		EndCharIndex   int     `json:"end_char_index"`
	}
	futureDelta struct {
		Type   string `json:"type"`
		Detail string `json:"detail"`
	}
)

// planReply decides the answer to req: its blocks, in the order the API
// sends them, and its stop reason.
//
//   - With thinking enabled, a thinking block first: [[thinking_tokens=N]]
//     words (default 8, capped by budget_tokens) as thinking_delta, then one
//     signature_delta; [[redacted_thinking]] adds a redacted_thinking block
//     after it.
//   - [[unknown_event]]: a future_block with one future_delta (no tokens).
//   - [[delta_fields]]: no block of its own; message_delta's delta (and the
//     whole message) carries stop_details, container and future_field.
//   - A text block of the request's [[reply_tokens=N]] words, or
//     defaultTokens (with a tool call: only with the directive, else none).
//     The words start at a point picked by a hash of the last user message,
//     so replies differ between prompts but not between runs. A stop
//     sequence stops the reply before the first word that contains it
//     (stop_reason "stop_sequence"); sequences spanning words are not seen.
//     [[citations]] ends the block with a citations_delta.
//   - A tool call ([[tool_use=NAME]], [[tool_use]] for the first tool, or
//     tool_choice any/tool): a tool_use block whose input, made from the
//     tool's input_schema, streams as input_json_delta pieces of up to 8
//     bytes, one output token each (stop_reason "tool_use").
//
// max_tokens caps the output tokens (stop_reason "max_tokens"): text is
// cut, and a tool call that does not fit whole is left out.
func planReply(req *messagesRequest, defaultTokens int) reply {
	d := req.directives
	r := reply{stopReason: stopEndTurn, unknownEvent: d.unknownEvent}
	last := lastUserText(req.turns)
	h := fnv.New32a()
	_, _ = h.Write([]byte(last))
	seed := int(h.Sum32() % uint32(len(replyWords)))
	room := req.maxTokens
	if room <= 0 {
		room = 1 << 30
	}

	if req.thinking != nil {
		n := defaultThinkingTokens
		if d.thinkingTokens >= 0 {
			n = d.thinkingTokens
		}
		if req.thinking.budget > 0 {
			n = min(n, req.thinking.budget)
		}
		n = min(n, room)
		room -= n
		r.blocks = append(r.blocks, thinkingReply(words(seed+7, n)))
		if d.redactedThinking {
			data := redactedData(last)
			b := redactedThinkingBlock{Type: "redacted_thinking", Data: data}
			r.blocks = append(r.blocks, replyBlock{start: b, whole: b})
		}
	}
	if d.deltaFields {
		r.extras = &deltaExtras{
			container:   containerInfo{ID: fmt.Sprintf("container_011%08x", h.Sum32()), ExpiresAt: containerExpiry, Skills: []any{}},
			futureField: futureField{Detail: "a message_delta field this client does not know"},
		}
	}
	if d.unknownEvent {
		start := futureBlock{Type: "future_block", Detail: "a block type this client does not know"}
		r.blocks = append(r.blocks, replyBlock{start: start, whole: start,
			deltas: []replyDelta{{delta: futureDelta{Type: "future_delta", Detail: "a delta type this client does not know"}}}})
	}

	tool := req.toolCall()
	want := defaultTokens
	if d.replyTokens >= 0 {
		want = d.replyTokens
	} else if tool != nil {
		want = 0
	}
	if want > 0 || tool == nil {
		n := want
		if n > room {
			n = room
			r.stopReason = stopMaxTokens
		}
		tokens := make([]string, 0, n)
		for i := range n {
			word := replyWords[(seed+i)%len(replyWords)]
			if seq, ok := stopsAt(word, req.stopSequences); ok {
				r.stopReason, r.stopSequence = stopStopSequence, &seq
				break
			}
			tokens = append(tokens, word+" ")
		}
		room -= len(tokens)
		r.blocks = append(r.blocks, textReply(tokens, d.citations, last))
	}
	if tool != nil && r.stopReason == stopEndTurn {
		input := toolInput(tool.schema, seed)
		pieces := splitPieces(string(input), toolInputPiece)
		if len(pieces) <= room {
			r.blocks = append(r.blocks, toolUseReply(tool.name, input, pieces))
			r.stopReason = stopToolUse
		} else {
			r.stopReason = stopMaxTokens
		}
	}
	return r
}

// stopsAt reports the first stop sequence word contains.
func stopsAt(word string, seqs []string) (string, bool) {
	for _, seq := range seqs {
		if seq != "" && strings.Contains(word, seq) {
			return seq, true
		}
	}
	return "", false
}

// words is n reply words from start, each with a trailing space.
func words(start, n int) []string {
	out := make([]string, n)
	for i := range n {
		out[i] = replyWords[(start+i)%len(replyWords)] + " "
	}
	return out
}

func textReply(tokens []string, cite bool, source string) replyBlock {
	b := replyBlock{start: textBlock{Type: "text", Text: ""}}
	for _, t := range tokens {
		b.deltas = append(b.deltas, replyDelta{delta: textDelta{Type: "text_delta", Text: t}, token: true})
	}
	whole := textBlock{Type: "text", Text: strings.Join(tokens, "")}
	if cite && len(tokens) > 0 {
		c := citationOf(source)
		b.deltas = append(b.deltas, replyDelta{delta: citationsDelta{Type: "citations_delta", Citation: c}})
		whole.Citations = []any{c}
	}
	b.whole = whole
	return b
}

// citationOf cites the start of the prompt's last user message (the fake
// has no documents of its own): a char_location in document 0.
func citationOf(source string) citation {
	cited := source
	if len(cited) > 40 {
		cut := 40
		for cut > 0 && !utf8.RuneStart(cited[cut]) {
			cut--
		}
		cited = cited[:cut]
	}
	return citation{Type: "char_location", CitedText: cited, StartCharIndex: 0, EndCharIndex: utf8.RuneCountInString(cited)}
}

func thinkingReply(tokens []string) replyBlock {
	b := replyBlock{start: thinkingBlock{Type: "thinking"}}
	for _, t := range tokens {
		b.deltas = append(b.deltas, replyDelta{delta: thinkingDelta{Type: "thinking_delta", Thinking: t}, token: true})
	}
	text := strings.Join(tokens, "")
	sig := thinkingSignature(text)
	b.deltas = append(b.deltas, replyDelta{delta: signatureDelta{Type: "signature_delta", Signature: sig}})
	b.whole = thinkingBlock{Type: "thinking", Thinking: text, Signature: sig}
	return b
}

// thinkingSignature signs a thinking block's text, so that a block sent
// back in a later request can be checked as the API checks its own.
func thinkingSignature(thinking string) string {
	sum := sha256.Sum256([]byte("fakeanthropic thinking\x00" + thinking))
	return "EqF" + base64.StdEncoding.EncodeToString(sum[:])
}

func redactedData(seed string) string {
	sum := sha256.Sum256([]byte("fakeanthropic redacted\x00" + seed))
	return "EmR" + base64.StdEncoding.EncodeToString(sum[:])
}

func toolUseReply(name string, input json.RawMessage, pieces []string) replyBlock {
	id := "toolu_01" + rand.Text()[:22]
	b := replyBlock{
		start: toolUseBlock{Type: "tool_use", ID: id, Name: name, Input: json.RawMessage(`{}`)},
		whole: toolUseBlock{Type: "tool_use", ID: id, Name: name, Input: input},
	}
	// The API's first input_json_delta is empty; then the pieces.
	b.deltas = append(b.deltas, replyDelta{delta: inputJSONDelta{Type: "input_json_delta", PartialJSON: ""}})
	for _, p := range pieces {
		b.deltas = append(b.deltas, replyDelta{delta: inputJSONDelta{Type: "input_json_delta", PartialJSON: p}, token: true})
	}
	return b
}

// toolInput makes a tool's input from its input_schema: each property, by
// its type, gets reply words (string), 3 (integer), 1.5 (number), true
// (boolean), [] (array), {} (object) or the first of its enum.
func toolInput(schema json.RawMessage, seed int) json.RawMessage {
	var s struct {
		Properties map[string]struct {
			Type any   `json:"type"`
			Enum []any `json:"enum"`
		} `json:"properties"`
	}
	_ = json.Unmarshal(schema, &s)
	names := make([]string, 0, len(s.Properties))
	for k := range s.Properties {
		names = append(names, k)
	}
	sort.Strings(names)
	in := make(map[string]any, len(names))
	for i, k := range names {
		p := s.Properties[k]
		if len(p.Enum) > 0 {
			in[k] = p.Enum[0]
			continue
		}
		typ, _ := p.Type.(string)
		switch typ {
		case "integer":
			in[k] = 3
		case "number":
			in[k] = 1.5
		case "boolean":
			in[k] = true
		case "array":
			in[k] = []any{}
		case "object":
			in[k] = map[string]any{}
		default:
			in[k] = strings.TrimSpace(strings.Join(words(seed+3*i, 3), ""))
		}
	}
	b, _ := json.Marshal(in)
	return b
}

// splitPieces cuts s into pieces of at most n bytes, on rune boundaries.
func splitPieces(s string, n int) []string {
	var out []string
	for len(s) > 0 {
		cut := min(n, len(s))
		for cut < len(s) && !utf8.RuneStart(s[cut]) {
			cut++
		}
		out = append(out, s[:cut])
		s = s[cut:]
	}
	return out
}
