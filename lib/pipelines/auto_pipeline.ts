// diffusers' AutoPipelineForText2Image / AutoPipelineForImage2Image / DiffusionPipeline.from_pretrained: the
// pipeline class is read from the folder's model_index.json (`_class_name`), so the guide's snippet
// `AutoPipelineForText2Image.from_pretrained(model, torch_dtype=torch.float16).to("cuda")` has a one-line
// equivalent here for SD 1.x/2.x and SDXL folders alike.
import { resolvePretrained } from '../io/hub.js';
import { readModelIndex } from '../models/loading.js';
import { PIPELINE_OPTIONS, type PipelineFromPretrainedOptions } from './pipeline_utils.js';
import { StableDiffusionPipeline } from './stable_diffusion.js';
import { StableDiffusionImg2ImgPipeline } from './stable_diffusion_img2img.js';
import { StableDiffusionXLPipeline } from './stable_diffusion_xl.js';

/** The model family a pipeline folder holds. */
export type PipelineFamily = 'sd' | 'sdxl';

/** model_index.json `_class_name` → the family whose models it holds (img2img and inpaint folders share the models). */
const FAMILIES: Readonly<Record<string, PipelineFamily>> = {
  StableDiffusionPipeline: 'sd', StableDiffusionImg2ImgPipeline: 'sd', StableDiffusionInpaintPipeline: 'sd',
  StableDiffusionXLPipeline: 'sdxl', StableDiffusionXLImg2ImgPipeline: 'sdxl', StableDiffusionXLInpaintPipeline: 'sdxl',
};

/**
 * Which family a model folder (or cached model id) holds, from its model_index.json; SD 1.x/2.x when the file
 * names no class (older folders). Another class is an error naming it and what difflora runs.
 */
export function pipelineFamily(pathOrId: string, hub: { revision?: string; cacheDir?: string } = {}, where = 'AutoPipeline'): { family: PipelineFamily; className: string | undefined; dir: string } {
  const dir = resolvePretrained(pathOrId, hub);
  const cls = readModelIndex(dir)._class_name;
  if (cls === undefined) return { family: 'sd', className: undefined, dir };
  const family = typeof cls === 'string' && Object.hasOwn(FAMILIES, cls) ? FAMILIES[cls] : undefined;
  if (!family) {
    throw new Error(`${where}: '${dir}' holds a ${String(cls)} (model_index.json _class_name), which difflora cannot run; ` +
      'supported: StableDiffusionPipeline (SD 1.x/2.x) and StableDiffusionXLPipeline (SDXL), and their img2img/inpaint folders');
  }
  return { family, className: cls as string, dir };
}

function familyOf(pathOrId: string, o: PipelineFromPretrainedOptions, where: string): PipelineFamily {
  resolvePretrained(pathOrId, o, { known: PIPELINE_OPTIONS, where }); // option names checked before anything is read
  return pipelineFamily(pathOrId, { revision: o.revision, cacheDir: o.cacheDir }, where).family;
}

/** diffusers' AutoPipelineForText2Image: the text-to-image pipeline of the folder's family. */
export const AutoPipelineForText2Image = {
  fromPretrained(pathOrId: string, o: PipelineFromPretrainedOptions = {}): StableDiffusionPipeline | StableDiffusionXLPipeline {
    return familyOf(pathOrId, o, 'AutoPipelineForText2Image.fromPretrained') === 'sdxl'
      ? StableDiffusionXLPipeline.fromPretrained(pathOrId, o)
      : StableDiffusionPipeline.fromPretrained(pathOrId, o);
  },
} as const;

/** diffusers' AutoPipelineForImage2Image: the image-to-image pipeline of the folder's family (SD 1.x/2.x). */
export const AutoPipelineForImage2Image = {
  fromPretrained(pathOrId: string, o: PipelineFromPretrainedOptions = {}): StableDiffusionImg2ImgPipeline {
    if (familyOf(pathOrId, o, 'AutoPipelineForImage2Image.fromPretrained') === 'sdxl') {
      throw new Error("AutoPipelineForImage2Image.fromPretrained: SDXL image-to-image (StableDiffusionXLImg2ImgPipeline) is not in difflora yet; use an SD 1.x/2.x model, or StableDiffusionXLPipeline for text to image");
    }
    return StableDiffusionImg2ImgPipeline.fromPretrained(pathOrId, o);
  },
} as const;

/** diffusers' DiffusionPipeline.from_pretrained: the class model_index.json names (img2img folders give the img2img pipeline). */
export const DiffusionPipeline = {
  fromPretrained(pathOrId: string, o: PipelineFromPretrainedOptions = {}): StableDiffusionPipeline | StableDiffusionImg2ImgPipeline | StableDiffusionXLPipeline {
    resolvePretrained(pathOrId, o, { known: PIPELINE_OPTIONS, where: 'DiffusionPipeline.fromPretrained' });
    const { className } = pipelineFamily(pathOrId, { revision: o.revision, cacheDir: o.cacheDir }, 'DiffusionPipeline.fromPretrained');
    if (className === 'StableDiffusionImg2ImgPipeline') return StableDiffusionImg2ImgPipeline.fromPretrained(pathOrId, o);
    if (className === 'StableDiffusionXLPipeline') return StableDiffusionXLPipeline.fromPretrained(pathOrId, o);
    if (className === undefined || className === 'StableDiffusionPipeline') return StableDiffusionPipeline.fromPretrained(pathOrId, o);
    throw new Error(`DiffusionPipeline.fromPretrained: difflora has no ${className}; AutoPipelineForText2Image.fromPretrained loads the same models for text to image`);
  },
} as const;
