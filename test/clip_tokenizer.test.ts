// CLIPTokenizer against the ids transformers' slow CLIPTokenizer (no ftfy) produced for the goldens'
// prompts, called as train_text_to_image_lora.py's tokenize_captions does.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CLIPTokenizer, basicClean } from '../lib/models/clip_tokenizer.js';
import { fixtures } from './helpers.js';

interface Entry { prompt: string; input_ids: number[]; untruncated_ids: number[]; untruncated_len: number; tokens: string[]; truncated: boolean }
interface Golden { bos_id: number; eos_id: number; pad_id: number; model_max_length: number; ftfy_installed: boolean; entries: Entry[] }

const golden = JSON.parse(readFileSync(join(fixtures, 'goldens', 'tokenizer.json'), 'utf8')) as Golden;
const tok = CLIPTokenizer.fromPretrained(join(fixtures, 'tiny-sd'), { subfolder: 'tokenizer' });
const temps: string[] = [];
afterAll(() => { for (const d of temps) rmSync(d, { recursive: true, force: true }); });

describe('CLIPTokenizer config', () => {
  it('reads the special tokens and model_max_length', () => {
    expect(golden.ftfy_installed).toBe(false);
    expect(tok.modelMaxLength).toBe(golden.model_max_length);
    expect(tok.bosTokenId).toBe(golden.bos_id);
    expect(tok.eosTokenId).toBe(golden.eos_id);
    expect(tok.padTokenId).toBe(golden.pad_id);
    expect(tok.vocabSize).toBe(49408);
  });
});

describe('CLIPTokenizer against the goldens', () => {
  it.each(golden.entries.map((e) => [JSON.stringify(e.prompt).slice(0, 60), e] as const))('%s', (_, e) => {
    // BPE tokens and unpadded ids
    expect(['<|startoftext|>', ...tok.tokenize(e.prompt), '<|endoftext|>']).toEqual(e.tokens);
    expect([golden.bos_id, ...tok.encode(e.prompt), golden.eos_id]).toEqual(e.untruncated_ids);
    expect(e.untruncated_ids).toHaveLength(e.untruncated_len);
    // as the training script calls it
    const { inputIds, attentionMask } = tok.call(e.prompt, { maxLength: 77, padding: 'max_length', truncation: true });
    expect(inputIds).toEqual([e.input_ids]);
    const real = Math.min(e.untruncated_len, 77);
    expect(attentionMask[0]).toEqual([...Array<number>(real).fill(1), ...Array<number>(77 - real).fill(0)]);
  });

  it('batches every prompt into one padded call', () => {
    const { inputIds } = tok.call(golden.entries.map((e) => e.prompt), { padding: 'max_length', truncation: true });
    expect(inputIds).toEqual(golden.entries.map((e) => e.input_ids));
  });

  it('truncates the 109-token prompt to 77 ids ending in EOS', () => {
    const long = golden.entries.find((e) => e.truncated);
    expect(long?.untruncated_len).toBe(109);
    const ids = tok.call(long!.prompt, { padding: 'max_length', truncation: true }).inputIds[0]!;
    expect(ids).toHaveLength(77);
    expect(ids[0]).toBe(49406);
    expect(ids[76]).toBe(49407);
    expect(ids.slice(0, 76)).toEqual(long!.untruncated_ids.slice(0, 76));
    // without truncation nothing is cut
    expect(tok.call(long!.prompt).inputIds[0]).toEqual(long!.untruncated_ids);
  });

  it('inputIdsTensor gives the int64 [B, 77] batch of the training step', () => {
    const prompts = golden.entries.slice(0, 3).map((e) => e.prompt);
    const t = tok.inputIdsTensor(prompts);
    expect(t.dtype).toBe('int64');
    expect(t.shape).toEqual([3, 77]);
    expect(t.tolist()).toEqual(golden.entries.slice(0, 3).map((e) => e.input_ids));
    t.dispose();
  });
});

describe('CLIPTokenizer padding and truncation', () => {
  it('pads to the longest, to max_length, or not at all', () => {
    const texts = ['a photo of a cat', 'a cat'];
    const none = tok.call(texts);
    expect(none.inputIds).toEqual([[49406, 320, 1125, 539, 320, 2368, 49407], [49406, 320, 2368, 49407]]);
    expect(none.attentionMask).toEqual([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1]]);
    const longest = tok.call(texts, { padding: 'longest' });
    expect(longest.inputIds[1]).toEqual([49406, 320, 2368, 49407, 49407, 49407, 49407]);
    expect(longest.attentionMask[1]).toEqual([1, 1, 1, 1, 0, 0, 0]);
    expect(tok.call(texts, { padding: true })).toEqual(longest);
    const ten = tok.call(texts, { padding: 'max_length', maxLength: 10 });
    expect(ten.inputIds.map((r) => r.length)).toEqual([10, 10]);
  });

  it('truncates to a small maxLength keeping BOS and EOS', () => {
    expect(tok.call('a photo of a cat', { maxLength: 4, truncation: true }).inputIds).toEqual([[49406, 320, 1125, 49407]]);
    // maxLength without padding truncates by default, as in transformers
    expect(tok.call('a photo of a cat', { maxLength: 4 }).inputIds).toEqual([[49406, 320, 1125, 49407]]);
    expect(() => tok.call('a', { maxLength: 1 })).toThrow(/maxLength/);
  });

  it('toTensor refuses ragged rows', () => {
    expect(() => tok.toTensor([[1, 2], [1]])).toThrow(/pad them/);
  });
});

describe('CLIPTokenizer text handling', () => {
  it('cleans like BasicTokenizer: controls dropped, whitespace collapsed, CJK split, NFC, lower case', () => {
    expect(basicClean('  A\u0000B\u200b\tC\u00a0\u3000D\n')).toBe('ab c d'); // U+200B is Cf: dropped
    expect(basicClean('日本語')).toBe('日 本 語');
    expect(basicClean('Cafe\u0301')).toBe('café'); // NFC composes
    expect(basicClean('ΟΔΟΣ')).toBe('\u03bf\u03b4\u03bf\u03c2'); // final sigma ς, as Python's str.lower()
  });

  it('splits contractions, digits and punctuation runs as CLIP regex does', () => {
    expect(tok.tokenize("it's 2024!!! we'll")).toEqual(['it</w>', "'s</w>", '2</w>', '0</w>', '2</w>', '4</w>', '!!!</w>', 'we</w>', "'ll</w>"]);
  });

  it('keeps special tokens typed in a prompt whole', () => {
    expect(tok.encode('a<|endoftext|>b')).toEqual([320, 49407, 321]);
    // split out before the regex, so punctuation does not swallow the '<|'
    expect(tok.encode('!<|endoftext|>')).toEqual([256, 49407]);
  });

  it('encodes unicode through byte-level BPE', () => {
    expect(tok.tokenize('pokémon 🐱')).toEqual(['pokÃ©mon</w>', 'ðŁĲ±</w>']);
    // every regex piece ends a word, so decoding puts spaces between pieces (as transformers does)
    expect(tok.decode(tok.encode('café naïve — “quotes” 🐱 日本語'))).toBe('café naïve — “ quotes ” 🐱 日 本 語');
  });

  it('decodes ascii back to the text', () => {
    for (const text of ['a photo of a cat', 'a pokemon with blue eyes', 'hello world 2 0 2 4', 'a highly detailed fantasy landscape']) {
      const ids = tok.call(text).inputIds[0]!;
      expect(tok.decode(ids, { skipSpecialTokens: true })).toBe(text);
    }
    expect(tok.decode([49406, 320, 2368, 49407])).toBe('<|startoftext|>a cat <|endoftext|>');
    expect(tok.decode(tok.encode("hello, world! it's"), { cleanUpTokenizationSpaces: true })).toBe("hello, world! it's");
    expect(() => tok.decode([49408])).toThrow(/not in the vocabulary/);
  });
});

describe('CLIPTokenizer.fromPretrained errors', () => {
  it('says which file is missing and where', () => {
    const dir = mkdtempSync(join(tmpdir(), 'difflora-tok-'));
    temps.push(dir);
    mkdirSync(join(dir, 'tokenizer'));
    copyFileSync(join(fixtures, 'tiny-sd', 'tokenizer', 'merges.txt'), join(dir, 'tokenizer', 'merges.txt'));
    expect(() => CLIPTokenizer.fromPretrained(dir, { subfolder: 'tokenizer' })).toThrow(/missing vocab\.json in '.*tokenizer'/);
    copyFileSync(join(fixtures, 'tiny-sd', 'tokenizer', 'vocab.json'), join(dir, 'tokenizer', 'vocab.json'));
    expect(() => CLIPTokenizer.fromPretrained(dir)).toThrow(/pass \{ subfolder: 'tokenizer' \}/);
    expect(CLIPTokenizer.fromPretrained(dir, { subfolder: 'tokenizer' }).encode('a cat')).toEqual([320, 2368]);
    expect(() => CLIPTokenizer.fromPretrained(join(dir, 'nope'))).toThrow(/nope/);
  });

  it('reads pad_token from the config (SD 2.x pads with "!")', () => {
    const dir = mkdtempSync(join(tmpdir(), 'difflora-tok-'));
    temps.push(dir);
    for (const f of ['vocab.json', 'merges.txt']) copyFileSync(join(fixtures, 'tiny-sd', 'tokenizer', f), join(dir, f));
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ model_max_length: 77, pad_token: '!' }));
    const sd2 = CLIPTokenizer.fromPretrained(dir);
    expect(sd2.padTokenId).toBe(0);
    expect(sd2.call('a cat', { padding: 'max_length', maxLength: 6 }).inputIds).toEqual([[49406, 320, 2368, 49407, 0, 0]]);
  });
});

describe('CLIPTokenizer.fromPretrained on hostile files (issue #12)', () => {
  const source = join(fixtures, 'tiny-sd', 'tokenizer');
  const vocabText = readFileSync(join(source, 'vocab.json'), 'utf8');
  const mergesText = readFileSync(join(source, 'merges.txt'), 'utf8');
  /** A copy of the tiny-sd tokenizer with some files replaced. */
  const folder = (files: Record<string, string> = {}): string => {
    const dir = mkdtempSync(join(tmpdir(), 'difflora-tok-'));
    temps.push(dir);
    for (const f of ['vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json']) copyFileSync(join(source, f), join(dir, f));
    for (const [f, text] of Object.entries(files)) writeFileSync(join(dir, f), text);
    return dir;
  };
  const withVocab = (edit: (v: Record<string, unknown>) => void): string => {
    const v = JSON.parse(vocabText) as Record<string, unknown>;
    edit(v);
    return folder({ 'vocab.json': JSON.stringify(v) });
  };

  it.each([
    ['null', null, /vocab\.json '.*vocab\.json': token "cat<\/w>" has id null; ids must be integers in \[0, 10000000\)/],
    ['1.5 (was: "cannot be converted to a BigInt")', 1.5, /vocab\.json '.*': token "cat<\/w>" has id 1\.5/],
    ['-1', -1, /token "cat<\/w>" has id -1/],
    ['"x"', 'x', /token "cat<\/w>" has id "x"/],
    ['1e12', 1e12, /token "cat<\/w>" has id 1000000000000/],
  ])('a vocabulary id of %s is an error naming vocab.json and the token', (_name, id, message) => {
    expect(() => CLIPTokenizer.fromPretrained(withVocab((v) => { v['cat</w>'] = id; }))).toThrow(message);
  });

  it('two tokens with one id, an empty vocabulary and a non-object are errors naming vocab.json', () => {
    expect(() => CLIPTokenizer.fromPretrained(withVocab((v) => { v['cat</w>'] = 320; }))).toThrow(/vocab\.json '.*': tokens "a<\/w>" and "cat<\/w>" both have id 320/);
    expect(() => CLIPTokenizer.fromPretrained(folder({ 'vocab.json': '{}' }))).toThrow(/vocab\.json '.*' holds no tokens/);
    expect(() => CLIPTokenizer.fromPretrained(folder({ 'vocab.json': '[1, 2]' }))).toThrow(/vocab\.json '.*vocab\.json' must hold a JSON object, not an array/);
    expect(() => CLIPTokenizer.fromPretrained(folder({ 'vocab.json': '{"a": 1,' }))).toThrow(/vocab\.json '.*' is not valid JSON: unexpected end of file at line 1 column 9/);
  });

  it('merges.txt: each rule is two tokens, the header is required; errors give the line', () => {
    const lines = mergesText.split('\n');
    const garbage = [...lines.slice(0, 5), 'a b c', ...lines.slice(5)].join('\n');
    expect(() => CLIPTokenizer.fromPretrained(folder({ 'merges.txt': garbage }))).toThrow(/merges\.txt '.*merges\.txt' line 6: "a b c" is not a merge rule/);
    expect(() => CLIPTokenizer.fromPretrained(folder({ 'merges.txt': lines.slice(1).join('\n') }))).toThrow(/merges\.txt '.*' line 1: expected the '#version: …' header, got "i n"/);
    expect(() => CLIPTokenizer.fromPretrained(folder({ 'merges.txt': '' }))).toThrow(/merges\.txt '.*' line 1: expected the '#version/);
  });

  it.each([
    ['tokenizer_config.json', { pad_token: 42 }, /tokenizer_config\.json '.*': 'pad_token' must be a non-empty token string or an AddedToken object/],
    // an empty token would match at every position of a prompt: the splitter would never advance
    ['tokenizer_config.json', { bos_token: '' }, /tokenizer_config\.json '.*': 'bos_token' must be a non-empty token string/],
    ['special_tokens_map.json', { eos_token: { content: null } }, /special_tokens_map\.json '.*': 'eos_token' must be a non-empty token string/],
    ['special_tokens_map.json', { unk_token: null }, /special_tokens_map\.json '.*': 'unk_token' must be/],
    ['special_tokens_map.json', { pad_token: '<|pad|>' }, /special_tokens_map\.json '.*special_tokens_map\.json': 'pad_token' "<\|pad\|>" is not in vocab\.json '.*vocab\.json'/],
    ['tokenizer_config.json', { model_max_length: '77' }, /tokenizer_config\.json '.*': 'model_max_length' must be an integer ≥ 2 .*got "77"/],
    ['tokenizer_config.json', { model_max_length: 1 }, /'model_max_length' must be an integer ≥ 2/],
    ['tokenizer_config.json', { clean_up_tokenization_spaces: 'no' }, /'clean_up_tokenization_spaces' must be true or false, got "no"/],
    ['tokenizer_config.json', { added_tokens_decoder: { x: '<a>' } }, /'added_tokens_decoder': key "x" is not a token id/],
    ['tokenizer_config.json', { added_tokens_decoder: [] }, /'added_tokens_decoder' must be an object of id → token, got \[\]/],
    ['tokenizer_config.json', [], /tokenizer_config\.json '.*' must hold a JSON object, not an array/],
    ['added_tokens.json', { '<x>': 1.5 }, /added_tokens\.json '.*': token "<x>" has id 1\.5/],
  ])('%s with %j is an error naming the file and the field', (file, content, message) => {
    expect(() => CLIPTokenizer.fromPretrained(folder({ [file]: JSON.stringify(content) }))).toThrow(message);
  });

  it('a FIFO in place of vocab.json, merges.txt or tokenizer_config.json is refused at once, not waited on', () => {
    for (const f of ['vocab.json', 'merges.txt', 'tokenizer_config.json']) {
      const dir = folder();
      rmSync(join(dir, f));
      execFileSync('mkfifo', [join(dir, f)]);
      expect(() => CLIPTokenizer.fromPretrained(dir)).toThrow(new RegExp(`${f.replace('.', '\\.')} '.*${f.replace('.', '\\.')}' is a (socket or )?FIFO`));
    }
  });

  it('the constructor checks what it is given; toTensor refuses non-integer ids', () => {
    const vocab = JSON.parse(vocabText) as Record<string, number>;
    expect(() => new CLIPTokenizer({ ...vocab, x: null as unknown as number }, [])).toThrow(/CLIPTokenizer: vocab: token "x" has id null/);
    expect(() => new CLIPTokenizer(vocab, [], {}, { '': 5 })).toThrow(/added token "" → 5 must be a non-empty token/);
    expect(() => new CLIPTokenizer(vocab, [], { padToken: '' })).toThrow(/padToken must be a non-empty string/);
    expect(() => new CLIPTokenizer(vocab, [], { modelMaxLength: 1.5 })).toThrow(/modelMaxLength must be an integer ≥ 2/);
    expect(() => tok.toTensor([[1, 1.5]])).toThrow(/row 0, position 1: 1\.5 is not an integer token id/);
  });
});
