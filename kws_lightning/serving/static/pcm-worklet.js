// AudioWorklet: microphone audio (any rate, any channels) -> mono PCM16 at targetRate, posted in chunks.
// Downsampling low-passes first (windowed sinc at 0.45 x targetRate) so speech above 8 kHz does not alias
// into the band the model hears; then linear interpolation at the fractional step inRate / targetRate.
class PcmResampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.outRate = opts.targetRate || 16000;
    this.chunkSamples = opts.chunkSamples || 1600;
    this.step = sampleRate / this.outRate; // `sampleRate`: the AudioContext's, a worklet global
    this.taps = this.step > 1 ? PcmResampler.lowpass(0.45 * this.outRate / sampleRate, 63) : new Float32Array([1]);
    this.history = new Float32Array(this.taps.length);
    this.head = 0;
    this.filtered = [];
    this.pos = 0; // where the next output sample falls, in filtered input samples
    this.out = new Int16Array(this.chunkSamples);
    this.fill = 0;
  }

  static lowpass(cutoff, length) {
    const taps = new Float32Array(length);
    const middle = (length - 1) / 2;
    let sum = 0;
    for (let k = 0; k < length; k++) {
      const x = k - middle;
      const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
      const hamming = 0.54 - 0.46 * Math.cos((2 * Math.PI * k) / (length - 1));
      taps[k] = sinc * hamming;
      sum += taps[k];
    }
    for (let k = 0; k < length; k++) taps[k] /= sum; // unit gain at DC
    return taps;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const frames = input[0].length;
    const size = this.taps.length;
    for (let i = 0; i < frames; i++) {
      let value = 0;
      for (let c = 0; c < input.length; c++) value += input[c][i];
      this.history[this.head] = value / input.length;
      this.head = (this.head + 1) % size;
      let acc = 0;
      for (let k = 0; k < size; k++) acc += this.taps[k] * this.history[(this.head + k) % size];
      this.filtered.push(acc);
    }
    while (this.pos + 1 < this.filtered.length) {
      const i = Math.floor(this.pos);
      const f = this.pos - i;
      const sample = this.filtered[i] * (1 - f) + this.filtered[i + 1] * f;
      this.out[this.fill++] = Math.max(-32768, Math.min(32767, Math.round(sample * 32768)));
      if (this.fill === this.chunkSamples) {
        this.port.postMessage(this.out.buffer, [this.out.buffer]);
        this.out = new Int16Array(this.chunkSamples);
        this.fill = 0;
      }
      this.pos += this.step;
    }
    const used = Math.floor(this.pos);
    this.filtered = this.filtered.slice(used);
    this.pos -= used;
    return true;
  }
}

registerProcessor("pcm-resampler", PcmResampler);
