// The data options' defaults, defined once: the script's flag defaults for the dataset columns and the image
// transforms. The data components fill them in when used on their own; the training options
// (lib/training/options.ts TRAIN_DEFAULTS) take theirs from here.
export const DATA_DEFAULTS = Object.freeze({
  imageColumn: 'image',
  captionColumn: 'text',
  centerCrop: false,
  randomFlip: false,
  interpolation: 'lanczos',
  skipBroken: false,
} as const);
