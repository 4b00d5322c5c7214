package fakeanthropic

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// toolDef is one entry of a request's tools.
type toolDef struct {
	name   string
	schema json.RawMessage // input_schema (custom tools)
	custom bool            // a client tool the model may call (no type, or "custom")
}

// toolChoice is a request's tool_choice ("" when absent).
type toolChoice struct {
	typ  string // auto, any, tool, none
	name string // with tool
}

// thinkingParam is an enabled thinking configuration.
type thinkingParam struct {
	budget int // budget_tokens; 0 with adaptive
}

var toolNameRE = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,128}$`)

// parseToolDefs reads the names and schemas of tools (already checked to
// be a list of objects by parseTools), as the API checks them: every tool
// has a name; a custom tool has an input_schema object; names are unique.
func parseToolDefs(raw json.RawMessage, tools []block) ([]toolDef, *apiError) {
	if len(tools) == 0 {
		return nil, nil
	}
	var items []map[string]json.RawMessage
	if json.Unmarshal(raw, &items) != nil {
		return nil, invalidRequest("tools: Input should be a valid list")
	}
	defs := make([]toolDef, 0, len(items))
	seen := map[string]bool{}
	for i, m := range items {
		var d toolDef
		var typ string
		if rt := m["type"]; !isNull(rt) {
			if json.Unmarshal(rt, &typ) != nil {
				return nil, invalidRequest("tools.%d.type: Input should be a valid string", i)
			}
		}
		d.custom = typ == "" || typ == "custom"
		rn, ok := m["name"]
		if !ok || isNull(rn) {
			return nil, invalidRequest("tools.%d.name: Field required", i)
		}
		if json.Unmarshal(rn, &d.name) != nil {
			return nil, invalidRequest("tools.%d.name: Input should be a valid string", i)
		}
		if d.custom && !toolNameRE.MatchString(d.name) {
			return nil, invalidRequest("tools.%d.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'", i)
		}
		if d.custom {
			rs, ok := m["input_schema"]
			var schema map[string]json.RawMessage
			if !ok || isNull(rs) {
				return nil, invalidRequest("tools.%d.input_schema: Field required", i)
			}
			if json.Unmarshal(rs, &schema) != nil || schema == nil {
				return nil, invalidRequest("tools.%d.input_schema: Input should be a valid dictionary", i)
			}
			d.schema = rs
		}
		if seen[d.name] {
			return nil, invalidRequest("tools: Tool names must be unique.")
		}
		seen[d.name] = true
		defs = append(defs, d)
	}
	return defs, nil
}

// parseToolChoice reads tool_choice: {"type": "auto"|"any"|"none"} or
// {"type": "tool", "name": N} naming one of tools.
func parseToolChoice(raw json.RawMessage, defs []toolDef) (toolChoice, *apiError) {
	var tc toolChoice
	if isNull(raw) {
		return tc, nil
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(raw, &m) != nil || m == nil {
		return tc, invalidRequest("tool_choice: Input should be a valid dictionary")
	}
	_ = json.Unmarshal(m["type"], &tc.typ)
	switch tc.typ {
	case "auto", "any", "none":
	case "tool":
		if json.Unmarshal(m["name"], &tc.name) != nil || tc.name == "" {
			return tc, invalidRequest("tool_choice.tool.name: Field required")
		}
		if findTool(defs, tc.name) == nil {
			return tc, invalidRequest("tool_choice.tool.name: Tool '%s' not found in tools", tc.name)
		}
	default:
		return tc, invalidRequest("tool_choice: Input tag '%s' found using 'type' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'", tc.typ)
	}
	if tc.typ != "none" && tc.typ != "auto" && len(defs) == 0 {
		return tc, invalidRequest("tool_choice: tool_choice may only be specified while providing tools.")
	}
	return tc, nil
}

// parseThinking reads thinking: {"type": "enabled", "budget_tokens": N}
// (N at least 1,024 and below max_tokens), {"type": "adaptive"} or
// {"type": "disabled"}.
func parseThinking(raw json.RawMessage, maxTokens int, countOnly bool) (*thinkingParam, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(raw, &m) != nil || m == nil {
		return nil, invalidRequest("thinking: Input should be a valid dictionary")
	}
	var typ string
	_ = json.Unmarshal(m["type"], &typ)
	switch typ {
	case "disabled":
		return nil, nil
	case "adaptive":
		return &thinkingParam{}, nil
	case "enabled":
	default:
		return nil, invalidRequest("thinking: Input tag '%s' found using 'type' does not match any of the expected tags: 'enabled', 'disabled', 'adaptive'", typ)
	}
	rb, ok := m["budget_tokens"]
	if !ok || isNull(rb) {
		return nil, invalidRequest("thinking.enabled.budget_tokens: Field required")
	}
	n, err := parseInt(rb)
	if err != nil {
		return nil, invalidRequest("thinking.enabled.budget_tokens: Input should be a valid integer")
	}
	if n < 1024 {
		return nil, invalidRequest("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
	}
	if !countOnly && maxTokens <= n {
		return nil, invalidRequest("`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size")
	}
	return &thinkingParam{budget: n}, nil
}

func findTool(defs []toolDef, name string) *toolDef {
	for i := range defs {
		if defs[i].name == name {
			return &defs[i]
		}
	}
	return nil
}

// toolCall is the tool the reply calls, or nil: the one [[tool_use=NAME]]
// names, the first custom tool for [[tool_use]] or tool_choice any, the
// one tool_choice names. A directive naming a tool the request does not
// define is ignored (the model cannot call it), as is every call with
// tool_choice none.
func (req *messagesRequest) toolCall() *toolDef {
	tc, d := req.toolChoice, req.directives
	if tc.typ == "none" {
		return nil
	}
	if tc.typ == "tool" {
		return findTool(req.toolDefs, tc.name)
	}
	if d.toolUse != "" {
		if t := findTool(req.toolDefs, d.toolUse); t != nil && t.custom {
			return t
		}
		if tc.typ != "any" {
			return nil
		}
	}
	if d.toolUseAny || d.toolUse != "" || tc.typ == "any" {
		for i := range req.toolDefs {
			if req.toolDefs[i].custom {
				return &req.toolDefs[i]
			}
		}
	}
	return nil
}

// checkConversation checks the blocks that tie turns together, as the API
// does: a tool_use (id, name, input) only in an assistant message, and a
// tool_result for each of its ids in the user message right after it; a
// tool_result (tool_use_id) only in a user message, answering a tool_use
// of the assistant message right before it; a thinking block sent back
// unchanged (its signature checks).
func checkConversation(turns []turn) *apiError {
	uses := make([][]string, len(turns))
	for i, t := range turns {
		for j, b := range t.blocks {
			at := fmt.Sprintf("messages.%d.content.%d", i, j)
			switch b.typ {
			case "tool_use", "server_tool_use":
				if t.role != "assistant" {
					return invalidRequest("%s: `%s` blocks can only be in `assistant` messages", at, b.typ)
				}
				var u struct {
					ID    *string         `json:"id"`
					Name  *string         `json:"name"`
					Input json.RawMessage `json:"input"`
				}
				_ = json.Unmarshal(b.raw, &u)
				var input map[string]json.RawMessage
				switch {
				case u.ID == nil:
					return invalidRequest("%s.id: Field required", at)
				case u.Name == nil:
					return invalidRequest("%s.name: Field required", at)
				case isNull(u.Input):
					return invalidRequest("%s.input: Field required", at)
				case json.Unmarshal(u.Input, &input) != nil || input == nil:
					return invalidRequest("%s.input: Input should be a valid dictionary", at)
				}
				if b.typ == "tool_use" {
					uses[i] = append(uses[i], *u.ID)
				}
			case "tool_result":
				if t.role != "user" {
					return invalidRequest("%s: `tool_result` blocks can only be in `user` messages", at)
				}
				var r struct {
					ToolUseID *string `json:"tool_use_id"`
				}
				_ = json.Unmarshal(b.raw, &r)
				if r.ToolUseID == nil {
					return invalidRequest("%s.tool_use_id: Field required", at)
				}
				if i == 0 || !slices.Contains(toolUseIDs(turns[i-1]), *r.ToolUseID) {
					return invalidRequest("%s: unexpected `tool_use_id` found in `tool_result` blocks: %s. Each `tool_result` block must have a corresponding `tool_use` block in the previous message.", at, *r.ToolUseID)
				}
			case "thinking":
				var th struct {
					Thinking  *string `json:"thinking"`
					Signature *string `json:"signature"`
				}
				_ = json.Unmarshal(b.raw, &th)
				switch {
				case t.role != "assistant":
					return invalidRequest("%s: `thinking` blocks can only be in `assistant` messages", at)
				case th.Thinking == nil:
					return invalidRequest("%s.thinking: Field required", at)
				case th.Signature == nil:
					return invalidRequest("%s.signature: Field required", at)
				case *th.Signature != thinkingSignature(*th.Thinking):
					return invalidRequest("%s: Invalid `signature` in `thinking` block", at)
				}
			}
		}
	}
	for i := range turns {
		if len(uses[i]) > 0 && i+1 < len(turns) {
			answered := toolResultIDs(turns[i+1])
			var missing []string
			for _, id := range uses[i] {
				if !slices.Contains(answered, id) {
					missing = append(missing, id)
				}
			}
			if len(missing) > 0 {
				return invalidRequest("messages.%d: `tool_use` ids were found without `tool_result` blocks immediately after: %s. Each `tool_use` block must have a corresponding `tool_result` block in the next message.", i, strings.Join(missing, ", "))
			}
		}
	}
	return nil
}

func toolUseIDs(t turn) []string {
	var ids []string
	for _, b := range t.blocks {
		if b.typ == "tool_use" {
			var u struct{ ID string }
			_ = json.Unmarshal(b.raw, &u)
			ids = append(ids, u.ID)
		}
	}
	return ids
}

func toolResultIDs(t turn) []string {
	if t.role != "user" {
		return nil
	}
	var ids []string
	for _, b := range t.blocks {
		if b.typ == "tool_result" {
			var r struct {
				ToolUseID string `json:"tool_use_id"`
			}
			_ = json.Unmarshal(b.raw, &r)
			ids = append(ids, r.ToolUseID)
		}
	}
	return ids
}

// toolResultTexts are the texts of a tool_result block's content (a string
// or text blocks).
func toolResultTexts(raw []byte) []string {
	var r struct {
		Content json.RawMessage `json:"content"`
	}
	_ = json.Unmarshal(raw, &r)
	var s string
	if json.Unmarshal(r.Content, &s) == nil {
		return []string{s}
	}
	var blocks []struct{ Type, Text string }
	_ = json.Unmarshal(r.Content, &blocks)
	var out []string
	for _, b := range blocks {
		if b.Type == "text" {
			out = append(out, b.Text)
		}
	}
	return out
}
